"""Export a trained run as one self-contained ONNX graph (or OpenVINO IR) that scores like it."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hamacho.errors import ConfigError
from hamacho.export.graph import build_graph, metadata
from hamacho.export.writers import write_onnx, write_openvino

FORMATS = {"onnx": ".onnx", "openvino": ".xml"}
__all__ = ["FORMATS", "export_run"]


def export_run(run_dir: str | Path, fmt: str = "onnx", output: str | Path | None = None) -> Path:
    """Write ``run_dir``'s model as ``fmt`` (default file RUN/model.onnx or RUN/model.xml)."""
    from hamacho import engine, rundir

    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}. Valid: {', '.join(FORMATS)}")
    run = engine.load_run(run_dir)
    out = Path(output) if output else run.path / f"model{FORMATS[fmt]}"
    rundir.check_folder(out.parent, "export", "Choose a writable --output file")
    graph = build_graph(run)
    props = metadata(run)
    if fmt == "onnx":
        return write_onnx(graph, out, props)
    with tempfile.TemporaryDirectory() as tmp:  # OpenVINO converts from the ONNX graph
        onnx_file = write_onnx(graph, Path(tmp) / "model.onnx", props)
        return write_openvino(onnx_file, out, props)
