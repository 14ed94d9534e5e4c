"""PatchCore update and merge: bank size, the patches it stands for, leave-one-out after it."""

from __future__ import annotations

import math

import torch
from hamacho_patchcore.model import PatchCore, PatchCoreConfig

from hamacho import config as config_mod
from hamacho.engine import make_components

TINY = {"backbone": "resnet18", "weights": "none", "pretrain_embed_dim": 64, "embedding_dim": 32}


def _model(**overrides: object) -> PatchCore:
    sections = [{"model": {**TINY, **overrides}, "run": {"device": "cpu"}}]
    cfg = config_mod.resolve(PatchCoreConfig, sections)
    return PatchCore(cfg.model, make_components(cfg))


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def _batches(images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    return [{"image": images[i : i + 3]} for i in range(0, len(images), 3)]


def test_update_keeps_ratio_of_all_patches_and_leave_one_out_of_the_new_images():
    model = _model(coreset_ratio=0.25)
    model.fit(_batches(_images(5, 0)))
    patches, old = model.train_patches, model.bank.clone()
    new = _images(3, 1)
    model.update(_batches(new))
    assert model.train_patches == patches * 8 // 5
    assert len(model.bank) == math.ceil(0.25 * model.train_patches)
    assert torch.equal(model.bank[: len(old)], old)  # the old coreset stays; the greedy grows it
    assert set(model.bank_source.unique().tolist()) <= set(range(8))
    scores = model.training_scores(_batches(new))
    # by hand: each new image's worst patch against the bank rows of every other image
    emb, _ = model.embedder(new)
    for i in range(3):
        others = model.bank[model.bank_source != 5 + i].float()
        want = torch.cdist(emb[i].float(), others).min(dim=1).values.max()
        assert torch.allclose(scores[i], want, rtol=1e-4)


def test_update_at_max_bank_size_re_reduces_old_rows_and_new_patches_together():
    model = _model(coreset_ratio=0.25)
    model.fit(_batches(_images(4, 0)))
    capped = _model(coreset_ratio=0.25, max_bank_size=len(model.bank))
    capped.fit(_batches(_images(4, 0)))
    # a new variant, far from the old images; the target (a bank's worth) leaves no room to grow
    capped.update(_batches(_images(4, 1) * 4 + 3))
    assert len(capped.bank) == len(model.bank)
    sources = set(capped.bank_source.unique().tolist())
    assert sources & set(range(4)) and sources & set(range(4, 8))  # old rows gave way to new


def test_merge_keeps_distinct_image_ids_and_caps_at_max_bank_size():
    a, b = _model(), _model()
    a.fit(_batches(_images(4, 2)))
    b.fit(_batches(_images(4, 3)))
    state = {k: v for k, v in b.state_dict().items() if k not in ("bank_source", "train_patches")}
    old = _model()
    old.load_state_dict(state)  # an artifact saved before update existed
    assert old.train_patches == math.ceil(len(b.bank) / 0.1)
    total, own = a.train_patches + old.train_patches, a.bank.clone()
    a.merge([old])
    assert a.train_patches == total
    assert len(a.bank) == math.ceil(0.1 * total)
    # rows from the old artifact keep "unknown image" (-1); the site's own keep their ids 0-3
    from_old = (a.bank[:, None] == b.bank[None]).all(-1).any(1).tolist()
    from_own = (a.bank[:, None] == own[None]).all(-1).any(1).tolist()
    for row, source in enumerate(a.bank_source.tolist()):
        assert (source == -1 and from_old[row]) or (0 <= source < 4 and from_own[row])
    capped = _model(max_bank_size=20)
    capped.fit(_batches(_images(4, 2)))
    capped.merge([b])
    assert len(capped.bank) == 20
    assert capped.predict(_images(2, 4)).scores.isfinite().all()
