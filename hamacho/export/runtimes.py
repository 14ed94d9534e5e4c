"""Score decoded images with a run (torch) or its exported file (onnxruntime, OpenVINO)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hamacho.errors import ArtifactError, ConfigError, one_line
from hamacho.export import integrity
from hamacho.export.graph import parse_metadata, run_preprocess
from hamacho.export.writers import require
from hamacho.preprocess import Preprocess

RUNTIMES = ("torch", "onnx", "openvino")
SUFFIX = {"onnx": ".onnx", "openvino": ".xml"}


class Backend:
    """Scores lists of (H, W, 3) uint8 tensors; maps come back at the crop size (c, c)."""

    model: str
    threshold: float | None
    config: dict[str, Any]
    preprocess: Preprocess

    def score(self, images: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        """Scores (N,) and maps (N, c, c) float32 for decoded images of any sizes."""
        raise NotImplementedError

    def score_with_pixels(
        self, images: list[torch.Tensor]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``score`` plus the (N, c, c, 3) uint8 resized and cropped images the maps align with."""
        scores, maps = self.score(images)  # the exported graph resizes inside: pixels here
        return scores, maps, np.stack([self._pixels(image) for image in images])

    def _pixels(self, image: torch.Tensor) -> np.ndarray:
        """(H, W, 3) uint8 -> (c, c, 3) uint8 after the run's resize and crop."""
        return self.preprocess.pixels(image[None])[0].permute(1, 2, 0).byte().numpy()


class TorchBackend(Backend):
    """A run directory scored by its torch model, through the engine's predict_batch."""

    def __init__(self, run_dir: str | Path) -> None:
        from hamacho import engine

        self.run = engine.load_run(run_dir)
        self.model = str(self.run.metadata.get("model", ""))
        self.threshold = self.run.threshold
        self.config = self.run.config.to_dict()
        self.preprocess = run_preprocess(self.run)

    def score(self, images: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        scores, maps, _ = self._score(images)
        return scores, maps

    def score_with_pixels(
        self, images: list[torch.Tensor]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``score`` plus the resized, cropped uint8 images: each image is resized once."""
        scores, maps, pixels = self._score(images)
        return scores, maps, pixels.permute(0, 2, 3, 1).byte().numpy()

    def _score(self, images: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
        from hamacho.runtime import predict_batch

        with torch.no_grad():  # images of different sizes: each resized and cropped on its own
            pixels = torch.cat([self.preprocess.pixels(image[None]) for image in images])
            batch = self.preprocess.normalize(pixels)
        pred = predict_batch(self.run.model, batch, self.run.tiler)
        return pred.scores.float().cpu().numpy(), pred.maps.float().cpu().numpy(), pixels


class _ExportedBackend(Backend):
    """Common part of the exported-file backends: metadata and same-size grouping."""

    def _setup(self, props: dict[str, str], path: Path, *files: bytes) -> None:
        """Check ``files`` (the exported bytes) against ``props`` and the run beside them."""
        if "config" not in props or "normalization" not in props:
            raise ArtifactError(f"'{path}' has no hamacho metadata: export it with hamacho export")
        integrity.verify(path, props, *files)
        integrity.check_run(path, props)
        meta = parse_metadata(props)
        self.path, self.model, self.threshold = path, meta["model"], meta["threshold"]
        self.config = meta["config"]
        data, norm = self.config["data"], meta["normalization"]
        self.preprocess = Preprocess(
            data["image_size"], data["crop_size"], norm["mean"], norm["std"]
        )

    def score(self, images: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, image in enumerate(images):
            groups[tuple(image.shape)].append(i)  # one call per image size: (n, H, W, 3)
        c = self.preprocess.crop_size
        scores = np.empty(len(images), np.float32)
        maps = np.empty((len(images), c, c), np.float32)
        for index in groups.values():
            batch = np.stack([images[i].numpy() for i in index])
            scores[index], maps[index] = self._run(batch)
        return scores, maps

    def _run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError


class OnnxBackend(_ExportedBackend):
    """An exported .onnx file run by onnxruntime on the CPU."""

    def __init__(self, path: Path) -> None:
        ort = require("onnxruntime")
        payload = path.read_bytes()  # read once: checked, then handed to onnxruntime
        try:
            self.session = ort.InferenceSession(payload, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own types for any unreadable file
            raise ArtifactError(
                f"'{path}' is not a readable ONNX file ({one_line(exc)}): it was modified or "
                "truncated. Export it again with `hamacho export --run RUN`"
            ) from None
        self._setup(self.session.get_modelmeta().custom_metadata_map, path, payload)

    def _run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        score, amap = self.session.run(["score", "map"], {"image": batch})
        return score, amap


class OpenVinoBackend(_ExportedBackend):
    """An exported OpenVINO IR (.xml + .bin) compiled for the CPU."""

    def __init__(self, path: Path) -> None:
        ov = require("openvino")
        weights_file = path.with_suffix(".bin")
        if not weights_file.is_file():
            raise ArtifactError(f"'{weights_file}' is missing: keep it beside '{path}'")
        xml, weights = path.read_bytes(), weights_file.read_bytes()  # checked, then compiled
        try:
            model = ov.Core().read_model(xml, weights)
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses of its own
            raise ArtifactError(
                f"'{path}' is not a readable OpenVINO IR ({one_line(exc)}): it was modified or "
                "truncated. Export it again with `hamacho export --run RUN --format openvino`"
            ) from None
        info = model.get_rt_info()
        props = {}
        if "hamacho" in info:
            props = {k: v.astype(str) for k, v in info["hamacho"].items()}
        self._setup(props, path, xml, weights)
        # f32 inference: the CPU plugin would otherwise pick bf16/f16 where the CPU has them
        self.compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})

    def _run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = self.compiled([batch])
        return out[self.compiled.output("score")], out[self.compiled.output("map")]


def exported_path(source: str | Path, runtime: str) -> Path:
    """The exported file of ``runtime`` for a run directory or a file path."""
    path = Path(source)
    if path.is_dir():
        path = path / f"model{SUFFIX[runtime]}"
    if not path.exists():
        run = path.parent
        raise ArtifactError(
            f"no exported model at '{path}'. Export it first: hamacho export --run {run} "
            f"--format {runtime}"
        )
    return path


def infer_runtime(source: str | Path) -> str:
    """The runtime a source implies: .onnx -> onnx, .xml -> openvino, anything else torch."""
    suffix = Path(source).suffix.lower()
    return {".onnx": "onnx", ".xml": "openvino"}.get(suffix, "torch")


def open_backend(source: str | Path, runtime: str | None = None) -> Backend:
    """A backend for a run directory or exported file (runtime None: from the file suffix)."""
    runtime = runtime or infer_runtime(source)
    if runtime not in RUNTIMES:
        raise ConfigError(f"unknown runtime {runtime!r}. Valid: {', '.join(RUNTIMES)}")
    if runtime == "torch":
        if infer_runtime(source) != "torch":
            raise ConfigError(
                f"'{source}' is an exported file; load it with runtime="
                f"{infer_runtime(source)!r}, or pass the run directory for torch"
            )
        return TorchBackend(source)
    path = exported_path(source, runtime)
    return OnnxBackend(path) if runtime == "onnx" else OpenVinoBackend(path)
