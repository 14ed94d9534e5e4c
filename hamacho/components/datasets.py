"""Dataset layouts: which images a split holds, their labels, defect types and masks."""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from pathlib import Path

from hamacho.errors import ConfigError, DataError, one_line

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
_GOOD_LABELS = frozenset({"good", "normal", "ok", "0"})
_LAYOUTS = (
    "expected an MVTec AD category (train/good/*.png, test/<good|defect>/*.png, "
    "ground_truth/<defect>/<stem>_mask.png), a folder of good images, "
    "a CSV file list (path,label[,mask[,split]]), "
    "or a YAML folder spec (normal: DIR, abnormal: [DIR, ...], masks: DIR, normal_test: DIR)"
)
_SPEC_KEYS = ("normal", "normal_test", "abnormal", "masks")
# Separators, control characters and what Windows forbids in a file name.
_UNSAFE_CHARS = re.compile(r'[\x00-\x1f\x7f/\\:*?"<>|]')
_MAX_NAME = 120  # UTF-8 bytes: room for suffixes within a file system's 255


def safe_name(name: str) -> str:
    """``name`` (a label, defect type or file stem from the data) as one harmless path component.

    Nothing derived from data may become a path as it is: a CSV label ``../../x`` or ``/tmp/x``
    would put files outside the run. Separators and control characters become ``_``, leading
    dots too (no ``..``, no hidden files), and an empty result is ``_``.
    """
    cleaned = _UNSAFE_CHARS.sub("_", name).strip()
    cleaned = re.sub(r"^\.+", lambda m: "_" * len(m.group()), cleaned)
    return cleaned.encode()[:_MAX_NAME].decode(errors="ignore") or "_"


def unused_name(base: str, used: set[str], suffix: str = "") -> str:
    """``base + suffix``, else ``base_2 + suffix``, ``base_3 + suffix``, ...: the first not in
    ``used``; it is added to ``used``."""
    name, n = base + suffix, 1
    while name in used:
        n += 1
        name = f"{base}_{n}{suffix}"
    used.add(name)
    return name


@dataclass(frozen=True)
class Sample:
    """One image of a dataset split: label 0 good / 1 defect, defect type, optional mask."""

    path: Path
    label: int
    defect: str = "good"
    mask: Path | None = None


def find_samples(root: str | Path, split: str, *, skip_bad: bool = False) -> list[Sample]:
    """List the `split` ("train" | "test") samples of a dataset, sorted by path.

    Layouts: an MVTec AD category folder; a plain folder of good images (train only); a CSV
    file list `path,label[,mask[,split]]` (header optional; labels good/normal/ok/0 in any case
    are good, 1 is defect "defect", any other text is the defect type as written; header and
    split are case-insensitive too; relative paths are resolved against the CSV's folder).
    Without a split column a CSV's train split is its good rows and its test split is all rows.
    Missing masks or CSV files raise DataError unless `skip_bad`, in which case they are kept
    for ImageDataset to drop and report.
    """
    if split not in ("train", "test"):
        raise ConfigError(f"split={split!r} is not valid; use 'train' or 'test'")
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"dataset '{root}' does not exist; {_LAYOUTS}")
    if root.is_file():
        if root.suffix.lower() == ".csv":
            return _csv_samples(root, split, skip_bad)
        if root.suffix.lower() in (".yaml", ".yml"):
            return _spec_samples(root, split, skip_bad)
        raise DataError(
            f"dataset '{root}' is neither a .csv file list nor a .yaml spec; {_LAYOUTS}"
        )
    if (root / "train").is_dir() or (root / "test").is_dir():
        return _mvtec_samples(root, split, skip_bad)
    images = _list_images(root)
    if not images:
        raise DataError(_empty_message(root))
    if split == "test":
        raise DataError(
            f"folder '{root}' is a plain folder of good images and has no test split; "
            f"to test, use an MVTec AD category ({root}/test/<good|defect>/*.png with "
            "ground_truth/<defect>/<stem>_mask.png) or a CSV file list with labels"
        )
    return [Sample(path, 0) for path in images]


def _list_images(folder: Path) -> list[Path]:
    # Hidden files are skipped: macOS archives ship "._000.png" resource forks.
    return sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()
    )


def _empty_message(root: Path) -> str:
    categories = sorted(d.name for d in root.iterdir() if (d / "train").is_dir())
    if categories:
        shown = ", ".join(categories[:5]) + (", ..." if len(categories) > 5 else "")
        return f"folder '{root}' holds several categories ({shown}); pass one category folder"
    return f"folder '{root}' contains no images; {_LAYOUTS}"


def _mvtec_samples(root: Path, split: str, skip_bad: bool) -> list[Sample]:
    split_dir = root / split
    if not split_dir.is_dir():
        raise DataError(
            f"dataset '{root}' has no {split}/ folder; expected {split_dir}/<good|defect>/*.png"
        )
    if split == "train":
        good = split_dir / "good"
        samples = [Sample(p, 0) for p in _list_images(good if good.is_dir() else split_dir)]
    else:
        samples = []
        for sub in sorted(d for d in split_dir.iterdir() if d.is_dir()):
            if sub.name.startswith("."):
                continue
            if sub.name.lower() == "good":
                samples += [Sample(p, 0, sub.name) for p in _list_images(sub)]
                continue
            masks = _mask_finder(root / "ground_truth" / sub.name)
            for path in _list_images(sub):
                samples.append(Sample(path, 1, sub.name, masks(path, skip_bad)))
    if not samples and split == "train":
        good = split_dir / "good"
        state = "contains none" if good.is_dir() else "is missing"
        raise DataError(
            f"no training images: folder '{good}' {state}; put the good images in train/good/ "
            f"(*{', *'.join(sorted(IMAGE_EXTENSIONS))})"
        )
    if not samples:
        raise DataError(f"folder '{split_dir}' contains no images; {_LAYOUTS}")
    return samples


def _mask_finder(gt_dir: Path):
    """Return `find(image, skip_bad) -> mask path | None` for one defect type."""
    index = {p.stem: p for p in _list_images(gt_dir)} if gt_dir.is_dir() else None

    def find(image: Path, skip_bad: bool) -> Path | None:
        if index is None:  # no ground truth for this defect type: image-level labels only
            return None
        found = index.get(f"{image.stem}_mask") or index.get(image.stem)
        if found is not None:
            return found
        expected = gt_dir / f"{image.stem}_mask.png"
        if not skip_bad:
            raise DataError(
                f"missing mask '{expected}' for defective image '{image}'; add the mask, "
                "remove the image, or set data.skip_bad=true"
            )
        return expected  # ImageDataset drops it (and reports it) when skip_bad

    return find


def _csv_samples(csv_path: Path, split: str, skip_bad: bool) -> list[Sample]:
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read CSV file list '{csv_path}': {exc}") from exc
    reader = csv.reader(io.StringIO(text))
    rows = [
        (reader.line_num, cells)
        for cells in ([c.strip() for c in raw] for raw in reader)
        if any(cells) and not cells[0].startswith("#")
    ]
    columns = ["path", "label", "mask", "split"]
    if rows and "path" in (c.lower() for c in rows[0][1]):
        columns = [c.lower() for c in rows.pop(0)[1]]
        if set(columns) - {"path", "label", "mask", "split"} or "label" not in columns:
            raise DataError(f"CSV file list '{csv_path}': header must be path,label[,mask][,split]")
    samples = []
    for line, cells in rows:
        where = f"CSV file list '{csv_path}' line {line}"
        if not 2 <= len(cells) <= len(columns):
            raise DataError(f"{where}: expected path,label[,mask[,split]], got {len(cells)} cells")
        row = dict(zip(columns, cells, strict=False))
        sample, row_split = _csv_row(row, csv_path.parent, where, skip_bad)
        if row_split == split or (row_split is None and (split == "test" or sample.label == 0)):
            samples.append(sample)
    if not samples:
        raise DataError(f"CSV file list '{csv_path}' has no {split} rows; {_LAYOUTS}")
    return samples


def _csv_row(row: dict, base: Path, where: str, skip_bad: bool) -> tuple[Sample, str | None]:
    if not row.get("path") or not row.get("label"):
        raise DataError(f"{where}: the path and label cells must not be empty")
    path = base / Path(row["path"]).expanduser()
    mask = base / Path(row["mask"]).expanduser() if row.get("mask") else None
    label = row["label"]
    if label.lower() in _GOOD_LABELS:
        sample = Sample(path, 0, "good", mask)
    else:
        sample = Sample(path, 1, "defect" if label == "1" else label, mask)
    row_split = row.get("split", "").lower() or None
    if row_split not in (None, "train", "test"):
        raise DataError(f"{where}: split must be train or test, got {row['split']!r}")
    if row_split == "train" and sample.label == 1:
        raise DataError(f"{where}: defective image in the train split; train on good images only")
    for kind, file in (("image", path), ("mask", mask)):
        if file is not None and not skip_bad and not file.is_file():
            raise DataError(f"{where}: {kind} '{file}' does not exist; fix the path or the row")
    return sample, row_split


def _spec_samples(spec_path: Path, split: str, skip_bad: bool) -> list[Sample]:
    """Folders named in a YAML spec: train = ``normal``; test = ``normal_test`` + ``abnormal``.

    Each abnormal folder is one defect type (its name); masks are looked up by image stem in
    ``masks/<defect type>/`` or directly in ``masks/`` (``<stem>_mask.*`` or ``<stem>.*``).
    """
    spec = _read_spec(spec_path)
    base = spec_path.parent

    def folder(value: object, key: str) -> Path:
        path = base / Path(str(value)).expanduser()
        if not path.is_dir():
            raise DataError(f"dataset spec '{spec_path}': {key} folder '{path}' does not exist")
        return path

    if split == "train":
        return [Sample(p, 0) for p in _nonempty(folder(spec["normal"], "normal"))]
    samples = []
    if spec.get("normal_test"):
        test_good = folder(spec["normal_test"], "normal_test")
        samples += [Sample(p, 0) for p in _nonempty(test_good)]
    abnormal = spec.get("abnormal") or []
    for value in [abnormal] if isinstance(abnormal, str) else abnormal:
        sub = folder(value, "abnormal")
        masks = None
        if spec.get("masks"):
            mask_root = folder(spec["masks"], "masks")
            by_type = mask_root / sub.name
            if by_type.is_dir():  # masks/<defect type>/...
                masks = _mask_finder(by_type)
            elif _list_images(mask_root):  # one flat folder of masks
                masks = _mask_finder(mask_root)
        for path in _nonempty(sub):
            samples.append(Sample(path, 1, sub.name, masks(path, skip_bad) if masks else None))
    if not samples:
        raise DataError(
            f"dataset spec '{spec_path}' has no test images; add normal_test and/or abnormal"
        )
    return samples


def _read_spec(spec_path: Path) -> dict:
    import yaml

    try:
        spec = yaml.safe_load(spec_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise DataError(f"cannot read dataset spec '{spec_path}': {one_line(exc)}") from None
    if not isinstance(spec, dict) or "normal" not in spec:
        raise DataError(f"dataset spec '{spec_path}' must be a mapping with a normal: folder")
    unknown = sorted(set(spec) - set(_SPEC_KEYS))
    if unknown:
        raise DataError(
            f"dataset spec '{spec_path}': unknown key {unknown[0]!r}; "
            f"valid: {', '.join(_SPEC_KEYS)}"
        )
    return spec


def _nonempty(folder: Path) -> list[Path]:
    images = _list_images(folder)
    if not images:
        raise DataError(f"folder '{folder}' contains no images")
    return images
