"""Tests for dataset discovery, decoding and preprocessing."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import default_collate

from hamacho.components.data import (
    DataConfig,
    ImageDataset,
    Sample,
    denormalize,
    find_samples,
    load_image_tensor,
    make_loader,
    read_image,
)
from hamacho.errors import ConfigError, DataError

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _save(path: Path, pixels: np.ndarray | Image.Image, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    image.save(path, **kwargs)
    return path


def _rgb(size: int = 32, colour: tuple[int, int, int] = (120, 60, 30)) -> np.ndarray:
    return np.full((size, size, 3), colour, dtype=np.uint8)


def _mask(size: int = 32) -> np.ndarray:
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[8:16, 8:16] = 255
    return mask


def _mvtec(root: Path, size: int = 32) -> Path:
    for name in ("000.png", "001.png", "002.JPG"):
        _save(root / "train" / "good" / name, _rgb(size))
    _save(root / "train" / "good" / "._003.png", _rgb(size))  # macOS resource fork: ignored
    _save(root / "test" / "good" / "000.png", _rgb(size))
    _save(root / "test" / "scratch" / "000.png", _rgb(size))
    _save(root / "test" / "scratch" / "001.png", _rgb(size))
    _save(root / "ground_truth" / "scratch" / "000_mask.png", _mask(size))
    _save(root / "ground_truth" / "scratch" / "001_mask.png", _mask(size))
    return root


def _config(**kwargs) -> DataConfig:
    return DataConfig(**{"image_size": 32, "crop_size": None, **kwargs})


def test_find_samples_mvtec_train_sorted_and_filtered(tmp_path):
    samples = find_samples(_mvtec(tmp_path), "train")
    assert [s.path.name for s in samples] == ["000.png", "001.png", "002.JPG"]
    assert all(s.label == 0 and s.defect == "good" and s.mask is None for s in samples)


def test_find_samples_mvtec_test_labels_and_masks(tmp_path):
    root = _mvtec(tmp_path)
    samples = find_samples(root, "test")
    assert [(s.defect, s.label) for s in samples] == [("good", 0), ("scratch", 1), ("scratch", 1)]
    assert samples[0].mask is None
    assert samples[2].mask == root / "ground_truth" / "scratch" / "001_mask.png"


def test_find_samples_mvtec_missing_mask_names_it(tmp_path):
    root = _mvtec(tmp_path)
    (root / "ground_truth" / "scratch" / "001_mask.png").unlink()
    with pytest.raises(DataError, match=r"missing mask '.*scratch/001_mask\.png'.*skip_bad"):
        find_samples(root, "test")


def test_find_samples_mvtec_defect_without_ground_truth_has_no_mask(tmp_path):
    root = _mvtec(tmp_path)
    _save(root / "test" / "hole" / "000.png", _rgb())
    hole = [s for s in find_samples(root, "test") if s.defect == "hole"]
    assert len(hole) == 1 and hole[0].label == 1 and hole[0].mask is None


def test_find_samples_mvtec_without_test_folder(tmp_path):
    _save(tmp_path / "train" / "good" / "000.png", _rgb())
    with pytest.raises(DataError, match="has no test/ folder"):
        find_samples(tmp_path, "test")


def test_find_samples_plain_folder_is_all_train(tmp_path):
    for name in ("b.png", "a.jpeg", "c.Tiff", "notes.txt"):
        if name.endswith(".txt"):
            (tmp_path / name).write_text("not an image")
        else:
            _save(tmp_path / name, _rgb())
    samples = find_samples(tmp_path, "train")
    assert [s.path.name for s in samples] == ["a.jpeg", "b.png", "c.Tiff"]
    assert {s.label for s in samples} == {0}


def test_find_samples_plain_folder_has_no_test_split(tmp_path):
    _save(tmp_path / "a.png", _rgb())
    with pytest.raises(DataError, match=r"plain folder of good images and has no test split"):
        find_samples(tmp_path, "test")


def test_find_samples_empty_folder_names_folder_and_layout(tmp_path):
    (tmp_path / "sub").mkdir()
    with pytest.raises(DataError, match=rf"'{tmp_path}' contains no images; expected an MVTec"):
        find_samples(tmp_path, "train")


def test_find_samples_dataset_root_suggests_a_category(tmp_path):
    _mvtec(tmp_path / "bottle")
    _mvtec(tmp_path / "cable")
    with pytest.raises(DataError, match=r"several categories \(bottle, cable\)"):
        find_samples(tmp_path, "train")


def test_find_samples_missing_root_and_bad_split(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        find_samples(tmp_path / "nope", "train")
    with pytest.raises(ConfigError, match="split='val'"):
        find_samples(tmp_path, "val")


def test_find_samples_csv_without_header(tmp_path):
    for name in ("g1.png", "g2.png", "d1.png", "d2.png"):
        _save(tmp_path / "img" / name, _rgb())
    _save(tmp_path / "img" / "d1_mask.png", _mask())
    listing = tmp_path / "list.csv"
    listing.write_text(
        "img/g1.png,good\nimg/g2.png,0\n\nimg/d1.png,scratch,img/d1_mask.png\nimg/d2.png,1\n"
    )
    train = find_samples(listing, "train")
    assert [s.path for s in train] == [tmp_path / "img" / "g1.png", tmp_path / "img" / "g2.png"]
    test = find_samples(listing, "test")
    assert [(s.label, s.defect) for s in test] == [
        (0, "good"),
        (0, "good"),
        (1, "scratch"),
        (1, "defect"),
    ]
    assert test[2].mask == tmp_path / "img" / "d1_mask.png" and test[3].mask is None


def test_find_samples_csv_header_and_split_column(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        _save(tmp_path / name, _rgb())
    listing = tmp_path / "list.csv"
    listing.write_text("label,path,split\nnormal,a.png,train\ngood,b.png,test\nstain,c.png,\n")
    assert [s.path.name for s in find_samples(listing, "train")] == ["a.png"]
    assert [s.path.name for s in find_samples(listing, "test")] == ["b.png", "c.png"]


def test_find_samples_csv_good_labels_header_and_split_ignore_case(tmp_path):
    for name in ("a.png", "b.png", "c.png", "d.png"):
        _save(tmp_path / name, _rgb())
    listing = tmp_path / "list.csv"
    listing.write_text(
        "Path,LABEL,Split\na.png,Good,TRAIN\nb.png,NORMAL,\nc.png,Ok,Test\nd.png,Scratch,\n"
    )
    assert [s.path.name for s in find_samples(listing, "train")] == ["a.png", "b.png"]
    test = find_samples(listing, "test")
    assert [(s.path.name, s.label, s.defect) for s in test] == [
        ("b.png", 0, "good"),
        ("c.png", 0, "good"),
        ("d.png", 1, "Scratch"),  # a defect type is a name: kept as written
    ]


def test_find_samples_csv_errors_name_line(tmp_path):
    listing = tmp_path / "list.csv"
    listing.write_text("path,label\nmissing.png,good\n")
    with pytest.raises(DataError, match=r"line 2: image '.*missing\.png' does not exist"):
        find_samples(listing, "train")
    assert find_samples(listing, "train", skip_bad=True)[0].path.name == "missing.png"
    _save(tmp_path / "d.png", _rgb())
    listing.write_text("d.png,scratch,,train\n")
    with pytest.raises(DataError, match="line 1: defective image in the train split"):
        find_samples(listing, "train")


def test_read_image_converts_modes_to_rgb(tmp_path):
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 200, 10, 30] + [0] * 762)
    cases = {
        "l.png": (Image.new("L", (4, 4), 100), (100, 100, 100)),
        "la.png": (Image.new("LA", (4, 4), (100, 50)), (100, 100, 100)),
        "rgba.png": (Image.new("RGBA", (4, 4), (10, 20, 30, 0)), (10, 20, 30)),
        "p.png": (palette, (200, 10, 30)),
        "cmyk.jpg": (Image.new("CMYK", (4, 4), (0, 0, 0, 0)), (255, 255, 255)),
    }
    for name, (image, expected) in cases.items():
        rgb = read_image(_save(tmp_path / name, image))
        assert rgb.mode == "RGB" and rgb.size == (4, 4)
        assert np.abs(np.asarray(rgb).astype(int) - expected).max() <= 1, name


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_read_image_16_bit_scales_instead_of_clipping(tmp_path, suffix):
    values = np.array([[0, 257 * 10], [257 * 128, 65535]], dtype=np.uint16)
    path = _save(tmp_path / f"deep{suffix}", Image.fromarray(values))
    assert Image.open(path).mode in ("I;16", "I")
    rgb = np.asarray(read_image(path))
    assert rgb[..., 0].tolist() == [[0, 10], [128, 255]]
    assert (rgb[..., 0] == rgb[..., 2]).all()


def test_read_image_corrupt_and_missing_give_one_line_errors(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
        buffer, format="PNG"
    )
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    text = tmp_path / "text.png"
    text.write_text("hello")
    for path, reason in (
        (truncated, "truncated"),
        (text, "not a recognised image format"),
        (tmp_path / "gone.png", "file does not exist"),
    ):
        with pytest.raises(DataError) as info:
            read_image(path)
        message = str(info.value)
        assert message.startswith(f"cannot read image '{path}': ") and reason in message
        # read_image serves inference (predict, the API), where no data.skip_bad applies
        assert message.endswith("Replace or remove it") and "skip_bad" not in message
        assert "\n" not in message


def test_dataset_corrupt_image_fails_on_access(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    dataset = ImageDataset([Sample(bad, 0)], _config(), MEAN, STD)
    assert len(dataset) == 1
    with pytest.raises(DataError, match=r"cannot read image '.*bad\.png'"):
        dataset[0]


def test_dataset_mask_size_mismatch_names_both_files(tmp_path):
    image = _save(tmp_path / "img.png", _rgb(32))
    mask = _save(tmp_path / "mask.png", _mask(16))
    dataset = ImageDataset([Sample(image, 1, "scratch", mask)], _config(), MEAN, STD)
    with pytest.raises(DataError, match=r"mask '.*mask\.png' is 16x16 but image '.*img\.png'"):
        dataset[0]


def test_dataset_skip_bad_drops_and_lists_bad_samples(tmp_path):
    root = _mvtec(tmp_path)
    (root / "test" / "scratch" / "002.png").write_bytes(b"broken")
    _save(root / "test" / "scratch" / "003.png", _rgb())  # its mask is missing
    _save(root / "test" / "scratch" / "004.png", _rgb())
    _save(root / "ground_truth" / "scratch" / "004_mask.png", _mask(20))  # wrong size
    samples = find_samples(root, "test", skip_bad=True)
    assert len(samples) == 6
    dataset = ImageDataset(samples, _config(skip_bad=True), MEAN, STD)
    assert len(dataset) == 3
    assert [p.name for p, _ in dataset.skipped] == ["002.png", "003.png", "004.png"]
    assert "does not exist" in dataset.skipped[1][1] and "20x20" in dataset.skipped[2][1]
    assert all(dataset[i]["image"].shape == (3, 32, 32) for i in range(len(dataset)))


def test_dataset_skip_bad_with_nothing_usable_raises(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"broken")
    with pytest.raises(DataError, match="all 1 images are unusable"):
        ImageDataset([Sample(bad, 0)], _config(skip_bad=True), MEAN, STD)


def test_dataset_resize_and_crop_shapes(tmp_path):
    image = _save(tmp_path / "wide.png", _rgb(1)[:1].repeat(60, 0).repeat(100, 1))
    mask = _save(tmp_path / "wide_mask.png", np.zeros((60, 100), np.uint8))
    sample = Sample(image, 1, "hole", mask)
    item = ImageDataset([sample], _config(image_size=64, crop_size=48), MEAN, STD)[0]
    assert item["image"].shape == (3, 48, 48) and item["mask"].shape == (1, 48, 48)
    item = ImageDataset([sample], _config(image_size=64), MEAN, STD)[0]
    assert item["image"].shape == (3, 64, 64) and item["mask"].shape == (1, 64, 64)
    assert item["image"].dtype == torch.float32 and item["mask"].dtype == torch.float32


def test_config_rejects_crop_larger_than_image():
    with pytest.raises(ConfigError, match=r"data.crop_size=300 is larger than data.image_size=256"):
        DataConfig(image_size=256, crop_size=300)
    with pytest.raises(ConfigError, match="data.std"):
        DataConfig(std=[0.2, 0.0, 0.2])


def test_dataset_normalises_constant_colour(tmp_path):
    path = _save(tmp_path / "c.png", _rgb(16, (255, 0, 51)))
    image = ImageDataset([Sample(path, 0)], _config(), (0.5, 0.5, 0.2), (0.5, 0.25, 0.1))[0]
    expected = torch.tensor([1.0, -2.0, 0.0]).view(3, 1, 1).expand(3, 32, 32)
    assert torch.allclose(image["image"], expected, atol=1e-5)
    # data.mean / data.std in the config override the backbone's values.
    override = _config(mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])
    image = ImageDataset([Sample(path, 0)], override, MEAN, STD)[0]["image"]
    assert torch.allclose(image[:, 0, 0], torch.tensor([1.0, 0.0, 0.2]), atol=1e-5)


def test_dataset_binarises_and_crops_masks_like_images(tmp_path):
    image = _save(tmp_path / "img.png", _rgb(64))
    values = np.zeros((64, 64), np.uint8)
    values[16:24, 16:24] = 1  # faint non-zero still marks a defect
    values[40:48, 40:48] = 128
    mask = _save(tmp_path / "mask.png", values)
    config = _config(image_size=64, crop_size=32)  # crop box starts at (16, 16)
    item = ImageDataset([Sample(image, 1, "hole", mask)], config, MEAN, STD)[0]
    out = item["mask"][0]
    assert set(out.unique().tolist()) == {0.0, 1.0}
    assert out[0:8, 0:8].all() and out[24:32, 24:32].all() and out.sum() == 128


def test_dataset_reads_colour_and_palette_masks(tmp_path):
    image = _save(tmp_path / "img.png", _rgb(16))
    colour = np.zeros((16, 16, 3), np.uint8)
    colour[:4, :4] = (0, 0, 90)
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([0, 0, 0, 0, 0, 0] + [0] * 762)  # index 1 is black, still a defect
    palette.paste(1, (0, 0, 4, 4))
    for name, mask in (("colour.png", colour), ("palette.png", palette)):
        path = _save(tmp_path / name, mask)
        out = ImageDataset([Sample(image, 1, "x", path)], _config(image_size=16), MEAN, STD)[0]
        assert out["mask"].sum() == 16 and out["mask"][0, :4, :4].all(), name


def test_dataset_item_without_mask_is_zeros(tmp_path):
    item = ImageDataset([Sample(_save(tmp_path / "a.png", _rgb()), 0)], _config(), MEAN, STD)[0]
    assert item["mask"].shape == (1, 32, 32) and item["mask"].sum() == 0
    assert item["label"] == 0 and item["defect"] == "good" and item["path"].endswith("a.png")


def test_dataset_large_jpeg_with_mask_decodes_reduced(tmp_path):
    # JPEGs are decoded at reduced scale; the mask check must use the stored size.
    image = _save(tmp_path / "big.jpg", _rgb(512))
    values = np.zeros((512, 512), np.uint8)
    values[64:192, 64:192] = 255
    mask = _save(tmp_path / "big_mask.png", values)
    item = ImageDataset([Sample(image, 1, "x", mask)], _config(image_size=64), MEAN, STD)[0]
    assert item["image"].shape == (3, 64, 64) and item["mask"][0, 8:24, 8:24].sum() == 256


def test_make_loader_batches_dict_items(tmp_path):
    root = _mvtec(tmp_path)
    dataset = ImageDataset(find_samples(root, "test"), _config(crop_size=24), MEAN, STD)
    batches = list(make_loader(dataset, batch_size=2))
    assert [len(b["path"]) for b in batches] == [2, 1]
    first = batches[0]
    assert first["image"].shape == (2, 3, 24, 24) and first["mask"].shape == (2, 1, 24, 24)
    assert first["label"].tolist() == [0, 1] and first["defect"] == ["good", "scratch"]
    reference = default_collate([dataset[0], dataset[1]])
    assert torch.equal(first["image"], reference["image"])
    assert first["label"].dtype == reference["label"].dtype


def test_make_loader_shuffle_is_seeded(tmp_path):
    root = _mvtec(tmp_path)
    dataset = ImageDataset(find_samples(root, "train"), _config(), MEAN, STD)

    def order(seed):
        return [p for b in make_loader(dataset, 1, shuffle=True, seed=seed) for p in b["path"]]

    assert order(3) == order(3)
    assert sorted(order(3)) == sorted(s.path.as_posix() for s in dataset.samples)
    in_order = [p for b in make_loader(dataset, 1) for p in b["path"]]
    assert in_order == [s.path.as_posix() for s in dataset.samples]  # unshuffled by default
    orders = {tuple(order(seed)) for seed in range(10)}
    assert len(orders) > 1  # shuffle=True reorders, differently per seed


def test_load_image_tensor_matches_dataset(tmp_path):
    rng = np.random.default_rng(0)
    path = _save(tmp_path / "n.png", rng.integers(0, 255, (50, 70, 3), dtype=np.uint8))
    config = _config(image_size=40, crop_size=30)
    single = load_image_tensor(path, config, MEAN, STD)
    assert torch.equal(single, ImageDataset([Sample(path, 0)], config, MEAN, STD)[0]["image"])
    assert single.shape == (3, 30, 30)


def test_denormalize_restores_pixels(tmp_path):
    path = _save(tmp_path / "c.png", _rgb(8, (12, 200, 77)))
    image = load_image_tensor(path, _config(image_size=8), MEAN, STD)
    pixels = denormalize(image[None], MEAN, STD)
    assert pixels.shape == (1, 8, 8, 3) and pixels.dtype == np.uint8
    assert (pixels == np.array([12, 200, 77], np.uint8)).all()


def test_make_loader_workers_match_and_keep_one_line_errors(tmp_path):
    root = _mvtec(tmp_path)
    dataset = ImageDataset(find_samples(root, "test"), _config(), MEAN, STD)
    in_process = next(iter(make_loader(dataset, 3)))
    in_worker = next(iter(make_loader(dataset, 3, num_workers=1)))
    assert torch.equal(in_process["image"], in_worker["image"])
    assert in_process["defect"] == in_worker["defect"]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"broken")
    broken = ImageDataset([Sample(bad, 0)], _config(), MEAN, STD)
    with pytest.raises(DataError) as info:
        list(make_loader(broken, 1, num_workers=1))
    assert str(info.value).startswith(f"cannot read image '{bad}'") and "\n" not in str(info.value)


def _png(path: Path, value: int = 128, size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, np.uint8)).save(path)
    return path


def test_find_samples_yaml_folder_spec(tmp_path: Path) -> None:
    for i in range(3):
        _png(tmp_path / "ok" / f"{i}.png")
    _png(tmp_path / "ok_test" / "a.png")
    _png(tmp_path / "bad" / "dent" / "d1.png")
    _png(tmp_path / "bad" / "scratch" / "s1.png")
    _png(tmp_path / "gt" / "dent" / "d1_mask.png", 255)
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "normal: ok\nnormal_test: ok_test\nabnormal: [bad/dent, bad/scratch]\nmasks: gt\n"
    )
    assert [s.path.name for s in find_samples(spec, "train")] == ["0.png", "1.png", "2.png"]
    test = find_samples(spec, "test")
    assert [(s.path.name, s.label, s.defect) for s in test] == [
        ("a.png", 0, "good"),
        ("d1.png", 1, "dent"),
        ("s1.png", 1, "scratch"),
    ]
    assert test[1].mask == tmp_path / "gt" / "dent" / "d1_mask.png"
    assert test[2].mask is None  # no gt/scratch/: image-level labels only, as in MVTec
    # a defect type with masks somewhere but not for this image is a clear error
    with pytest.raises(DataError, match=r"missing mask .*s1_mask.png"):
        spec.write_text("normal: ok\nabnormal: [bad/scratch]\nmasks: gt/dent\n")
        find_samples(spec, "test")


def test_find_samples_yaml_spec_errors(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text("normal: nowhere\n")
    with pytest.raises(DataError, match="normal folder .*nowhere' does not exist"):
        find_samples(spec, "train")
    spec.write_text("normal: .\nabnormals: x\n")
    with pytest.raises(DataError, match="unknown key 'abnormals'; valid: normal, normal_test"):
        find_samples(spec, "train")
    _png(tmp_path / "ok" / "0.png")
    spec.write_text("normal: ok\n")
    with pytest.raises(DataError, match="has no test images"):
        find_samples(spec, "test")


def _sideways(width: int = 40, height: int = 20) -> Image.Image:
    """Left half red, right half blue: what the camera stored before applying orientation 6."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2] = (255, 0, 0)
    pixels[:, width // 2 :] = (0, 0, 255)
    return Image.fromarray(pixels)


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_read_image_applies_exif_orientation(tmp_path, suffix):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the stored left half is the top once upright
    path = _save(
        tmp_path / f"phone{suffix}",
        _sideways(),
        exif=exif,
        **({"quality": 95} if suffix == ".jpg" else {}),
    )
    upright = np.asarray(read_image(path)).astype(int)
    assert upright.shape == (40, 20, 3)
    assert upright[2, 10, 0] > 200 and upright[2, 10, 2] < 60  # top is red
    assert upright[37, 10, 2] > 200 and upright[37, 10, 0] < 60  # bottom is blue


def test_dataset_mask_of_rotated_image_compares_upright_sizes(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    image = _save(tmp_path / "img.jpg", _sideways(), exif=exif)
    mask = _save(tmp_path / "mask.png", np.zeros((40, 20), np.uint8))  # drawn on the upright view
    config = DataConfig(image_size=16, crop_size=None)
    item = ImageDataset([Sample(image, 1, "crack", mask)], config, MEAN, STD)[0]
    assert item["image"].shape == (3, 16, 16) and item["image"][0, 1, 8] > item["image"][2, 1, 8]


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # pytest re-enables it
def test_decompression_bomb_is_one_data_error_naming_the_limit(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("1", (9000, 10000)).save(path)  # 90 M pixels in a few kB, over PIL's 89.5 M
    with pytest.raises(DataError) as info:
        load_image_tensor(path, DataConfig(), MEAN, STD)
    message = str(info.value)
    assert str(path) in message and "data.max_pixels=89,478,485" in message
    assert "\n" not in message and "data.skip_bad" not in message


def test_max_pixels_setting_limits_and_allows(tmp_path):
    path = _save(tmp_path / "img.png", _rgb(32))
    with pytest.raises(DataError, match=r"32x32 = 1,024 pixels, more than data.max_pixels=1,000"):
        load_image_tensor(path, DataConfig(max_pixels=1000), MEAN, STD)
    assert load_image_tensor(path, DataConfig(max_pixels=1024), MEAN, STD).shape == (3, 224, 224)
    with pytest.raises(ConfigError, match="data.max_pixels=0"):
        DataConfig(max_pixels=0)


@pytest.mark.parametrize("good_exists", [True, False])
def test_find_samples_empty_training_folder_names_train_good(tmp_path, good_exists):
    if good_exists:
        (tmp_path / "train" / "good").mkdir(parents=True)
    else:
        (tmp_path / "train").mkdir()
    _save(tmp_path / "test" / "good" / "000.png", _rgb())
    with pytest.raises(DataError) as info:
        find_samples(tmp_path, "train")
    assert f"'{tmp_path / 'train' / 'good'}'" in str(info.value)
    assert "put the good images in train/good/" in str(info.value)


def test_dataset_skip_bad_messages_do_not_suggest_skip_bad_again(tmp_path):
    good = _save(tmp_path / "good.png", _rgb())
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"broken")
    config = DataConfig(image_size=16, crop_size=None, skip_bad=True)
    dataset = ImageDataset([Sample(good, 0), Sample(bad, 0)], config, MEAN, STD)
    assert len(dataset) == 1 and dataset.skipped[0][1].endswith("Replace or remove it")


def test_safe_name_keeps_one_harmless_component():
    from hamacho.components.data import safe_name

    hostile = ["../../x", "/tmp/x", "..", ".", "", "a\\b", "C:x", "\x00", ".hidden", "x" * 300]
    for name in [*hostile, "傷" * 100]:
        safe = safe_name(name)
        assert safe and "/" not in safe and "\\" not in safe and not safe.startswith(".")
        assert Path(safe).name == safe and len(safe.encode()) <= 120
    assert safe_name("scratch neck") == "scratch neck" and safe_name("good") == "good"


def test_decompression_bomb_prints_no_pil_warning(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("1", (9000, 10000)).save(path)
    code = (
        "import sys; from hamacho.components.data import DataConfig, load_image_tensor\n"
        "try: load_image_tensor(sys.argv[1], DataConfig(), (0.5,) * 3, (0.5,) * 3)\n"
        "except Exception as exc: print(type(exc).__name__)"
    )
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
    assert done.stdout.strip() == "TooManyPixelsError" and done.stderr == ""  # a DataError
