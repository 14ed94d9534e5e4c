"""The exported inference graph: decoded uint8 image in, score and anomaly map out."""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

import hamacho
from hamacho.components import artifact
from hamacho.errors import UsageError
from hamacho.export import integrity
from hamacho.export.tiled import TiledCore
from hamacho.preprocess import Preprocess
from hamacho.runtime import Run


class InferenceGraph(nn.Module):
    """(N, H, W, 3) uint8 RGB -> score (N,), map (N, c, c): Preprocess, then the model's hook."""

    def __init__(self, preprocess: Preprocess, core: nn.Module) -> None:
        super().__init__()
        self.preprocess = preprocess
        self.core = core

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Score a batch of decoded images of one size."""
        scores, maps = self.core(self.preprocess(image))
        return scores.to(torch.float32), maps.to(torch.float32)


def run_preprocess(run: Run) -> Preprocess:
    """The run's preprocessing module (its image/crop size and normalisation)."""
    data = run.config.data
    return Preprocess(data.image_size, data.crop_size, run.mean, run.std)


def build_graph(run: Run) -> InferenceGraph:
    """The run's model wrapped for export; UsageError when the model has no export hook."""
    name = run.metadata.get("model", type(run.model).__name__)
    hook = getattr(run.model, "export_module", None)
    module = hook() if callable(hook) else None
    if module is None:
        raise UsageError(
            f"model {name!r} does not support export (its plugin has no export_module hook); "
            "score it with `hamacho predict --runtime torch`"
        )
    preprocess = run_preprocess(run)
    if run.tiler is not None:  # the graph tiles inside, as predict_batch does
        module = TiledCore(module, run.tiler, preprocess.crop_size)
    return InferenceGraph(preprocess, module).eval()


def metadata(run: Run) -> dict[str, str]:
    """String metadata stored in every exported file (onnx metadata_props, OpenVINO rt_info)."""
    threshold = run.threshold
    return {
        "model": str(run.metadata.get("model", "")),
        "threshold": "" if threshold is None else repr(float(threshold)),
        "hamacho_version": hamacho.__version__,
        "trained_with_hamacho": str(run.metadata.get("hamacho_version", "")),
        integrity.RUN_KEY: artifact.read_checksum(run.path / integrity.ARTIFACT),
        "config": json.dumps(run.config.to_dict(), sort_keys=True),
        "normalization": json.dumps(run.metadata.get("normalization", {})),
        "outputs": "score (N,) float32; map (N, c, c) float32 at the centre-crop size",
    }


def parse_metadata(props: dict[str, str]) -> dict[str, Any]:
    """``metadata`` read back: threshold float | None, config dict, the rest as strings."""
    out: dict[str, Any] = dict(props)
    out["threshold"] = float(props["threshold"]) if props.get("threshold") else None
    out["config"] = json.loads(props.get("config", "{}"))
    out["normalization"] = json.loads(props.get("normalization", "{}"))
    return out
