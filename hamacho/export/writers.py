"""Write a run's inference graph as ONNX (and OpenVINO IR converted from that ONNX file)."""

from __future__ import annotations

import importlib
import logging
import tempfile
from pathlib import Path
from types import ModuleType

import torch

from hamacho.errors import UsageError
from hamacho.export import integrity
from hamacho.export.graph import InferenceGraph

logger = logging.getLogger(__name__)
EXTRAS = {"onnx": "onnx", "onnxscript": "onnx", "onnxruntime": "onnx", "openvino": "openvino"}


def require(module: str) -> ModuleType:
    """Import an optional dependency, or raise one line naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        extra = EXTRAS.get(module, module)
        raise UsageError(
            f"this needs the '{module}' package: pip install 'hamacho[{extra}]'"
        ) from None


def write_onnx(graph: InferenceGraph, output: Path, props: dict[str, str]) -> Path:
    """Export ``graph`` with dynamic N, H, W; add ``props`` as metadata; run onnx.checker."""
    onnx = require("onnx")
    require("onnxscript")  # torch.onnx's exporter is built on it
    size = graph.preprocess.image_size
    # an example unlike the fixed sizes (not square, not image_size), so nothing specialises
    example = torch.randint(0, 256, (2, size + 3, size + 5, 3), dtype=torch.uint8)
    batch, height, width = (torch.export.Dim(n, min=2) for n in ("N", "H", "W"))
    with tempfile.TemporaryDirectory() as tmp:
        program = torch.onnx.export(
            graph,
            (example,),
            input_names=["image"],
            output_names=["score", "map"],
            dynamic_shapes=({0: batch, 1: height, 2: width},),
            dynamo=True,
            optimize=True,
            verbose=False,
        )
        if program is None:  # only the legacy exporter returns None
            raise UsageError("torch.onnx.export returned no program; update torch")
        path = Path(tmp) / "model.onnx"
        program.save(str(path), external_data=False)
        model = onnx.load(str(path))
    del model.metadata_props[:]
    for key, value in {**props, integrity.KEY: integrity.PLACEHOLDER}.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    _fix_input_dims(model)
    onnx.checker.check_model(model, full_check=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    integrity.write_atomic(output, integrity.seal(model.SerializeToString()))
    return output


def _fix_input_dims(model: object) -> None:
    """Name the dynamic axes (N, H, W) for readers; a batch of 1 is allowed at run time."""
    dims = model.graph.input[0].type.tensor_type.shape.dim  # type: ignore[attr-defined]
    for dim, name in zip(dims, ("N", "H", "W"), strict=False):
        if not dim.dim_value:
            dim.dim_param = name


def write_openvino(onnx_path: Path, output: Path, props: dict[str, str]) -> Path:
    """Convert the ONNX file to OpenVINO IR (``.xml`` + ``.bin``) with ``props`` as rt_info."""
    ov = require("openvino")
    model = ov.convert_model(str(onnx_path))
    for key, value in {**props, integrity.KEY: integrity.PLACEHOLDER}.items():
        model.set_rt_info(value, ["hamacho", key])
    output.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(output), compress_to_fp16=False)  # fp32 weights: parity first
    weights = output.with_suffix(".bin")  # the checksum covers the weights and the xml
    integrity.write_atomic(output, integrity.seal(output.read_bytes(), weights.read_bytes()))
    return output
