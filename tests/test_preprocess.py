from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from hamacho.preprocess import Preprocess

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _image(h: int, w: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8)
    noise = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(base).resize((w, h), Image.Resampling.BICUBIC))
    return Image.fromarray(np.where(rng.random((h, w, 1)) < 0.2, noise, smooth))


@pytest.mark.parametrize(
    ("h", "w", "size", "crop"),
    [(90, 120, 64, 56), (64, 64, 64, None), (50, 37, 80, 64), (256, 256, 224, 200)],
)
def test_preprocess_matches_pil_bilinear_resize_and_crop_bit_for_bit(h, w, size, crop):
    img = _image(h, w)
    out = crop or size
    left = int(round((size - out) / 2))
    want = img.resize((size, size), Image.Resampling.BILINEAR)
    want = np.asarray(want.crop((left, left, left + out, left + out)), dtype=np.float32)
    got = Preprocess(size, crop, MEAN, STD).pixels(torch.from_numpy(np.asarray(img).copy())[None])
    np.testing.assert_array_equal(got[0].permute(1, 2, 0).numpy(), want)


def test_preprocess_normalises_and_batches():
    imgs = [np.asarray(_image(40, 30, seed)) for seed in (1, 2)]
    pre = Preprocess(32, 28, MEAN, STD)
    batch = pre(torch.from_numpy(np.stack(imgs)))
    assert batch.shape == (2, 3, 28, 28) and batch.dtype == torch.float32
    single = pre(torch.from_numpy(imgs[1].copy())[None])[0]
    torch.testing.assert_close(batch[1], single, rtol=0, atol=0)
    pixels = pre.pixels(torch.from_numpy(imgs[0].copy())[None])[0]
    want = (pixels / 255 - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    torch.testing.assert_close(batch[0], want, rtol=1e-5, atol=1e-5)
