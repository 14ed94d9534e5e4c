"""The train / test flows behind the CLI (usable from Python too); predict is in predicting.py."""

from __future__ import annotations

import copy
import datetime as _dt
import math
import time
from collections.abc import Callable, Iterable
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch
import yaml

import hamacho
from hamacho import config as config_mod
from hamacho import rundir
from hamacho.components import artifact, data, metrics, synthetic
from hamacho.components.features import NetworkFeatureAggregator
from hamacho.components.maps import AnomalyMapGenerator
from hamacho.components.sampling import CoresetSampler
from hamacho.components.search import NearestNeighbourSearch
from hamacho.config import Config
from hamacho.errors import (
    ArtifactError,
    ConfigError,
    UnknownModelError,
    WeightsUnavailableError,
)
from hamacho.evaluation import evaluate
from hamacho.model import Components, Model
from hamacho.plugins import ModelEntry, get_registry
from hamacho.predicting import expand_inputs as expand_inputs  # moved; still importable here
from hamacho.predicting import predict as predict
from hamacho.runtime import (
    Batches,
    Run,
    batch_loader,
    make_tiler,
    peak_rss_mb,
    per_image_max,
    predict_batch,
    write_json,
)

ARTIFACT = "model.safetensors"
_TRAIN_FIX = "Choose a writable --output folder"
_TEST_FIX = "Copy the run folder somewhere writable (`hamacho predict` writes nothing into it)"
Echo = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


# -- set-up ----------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when present, else cpu; a device this machine lacks is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)  # the spelling is checked when the config resolves
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ConfigError(
                f"run.device={name}, but this machine has {count or 'no'} CUDA device"
                f"{'' if count == 1 else 's'}. Set run.device=auto or run.device=cpu"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(
            "run.device=mps, but MPS is not available here. Set run.device=auto or run.device=cpu"
        )
    return device


def make_components(cfg: Config) -> Components:
    """The shared components for one run, bound to its device."""
    device = resolve_device(cfg.run.device)

    def aggregator(backbone: Any, layers: list[str], **kw: Any) -> NetworkFeatureAggregator:
        return NetworkFeatureAggregator(backbone, layers, device=device, **kw)

    def search(**kw: Any) -> NearestNeighbourSearch:
        return NearestNeighbourSearch(device=device, **kw)

    def sampler(**kw: Any) -> CoresetSampler:
        return CoresetSampler(device=device, **kw)

    return Components(
        device=device,
        feature_aggregator=aggregator,
        search=search,
        sampler=sampler,
        anomaly_map=AnomalyMapGenerator,
    )


def plugin_defaults(cls: type[Model]) -> dict[str, Any]:
    """The ``config.yaml`` shipped beside a model's module, if any."""
    package = cls.__module__.rpartition(".")[0] or cls.__module__
    try:
        text = files(package).joinpath("config.yaml").read_text(encoding="utf-8")
    except (FileNotFoundError, ModuleNotFoundError, TypeError):
        return {}
    return yaml.safe_load(text) or {}


def build_config(
    cls: type[Model], config_file: str | Path | None = None, overrides: Iterable[str] = ()
) -> Config:
    """Dataclass defaults <- plugin config.yaml <- ``--config`` file <- ``--set`` overrides."""
    explicit = []
    if config_file:
        explicit.append(config_mod.load_yaml(config_file))
    explicit.append(config_mod.parse_overrides(list(overrides)))
    return config_mod.resolve(cls.Config, [plugin_defaults(cls)], explicit)


def build_model(entry: ModelEntry, cfg: Config, echo: Echo = _quiet) -> Model:
    """Construct the model; fall back to its offline backbone if the default one has no weights."""
    components = make_components(cfg)
    try:
        return entry.cls(cfg.model, components)
    except WeightsUnavailableError as exc:
        fallback = entry.cls.offline_fallback
        chosen = {f"model.{key}" for key in ("backbone", "layers", "weights")} & cfg.explicit
        if not fallback or chosen:
            raise
        echo(f"note: {exc}")
        desc = ", ".join(f"model.{k}={v}" for k, v in fallback.items())
        echo(f"note: using {desc} instead (set model.backbone to choose another backbone)")
        config_mod.apply(cfg, {"model": copy.deepcopy(fallback)})  # never alias the class's
        return entry.cls(cfg.model, components)


# -- train -----------------------------------------------------------------------------------
def train(
    model: str,
    data_dir: str | Path | None = None,
    config_file: str | Path | None = None,
    overrides: Iterable[str] = (),
    output: str | Path | None = None,
    progress: bool = False,
    echo: Echo = _quiet,
) -> Path:
    """Fit ``model`` on the good training images of ``data_dir`` and write a run directory.

    The run folder is replaced as a whole (hamacho.rundir): after a crash or an error it holds
    the complete old run or the complete new one, never a mix.
    """
    entry = get_registry().get(model)
    cfg = build_config(entry.cls, config_file, overrides)
    torch.manual_seed(cfg.run.seed)
    root = Path(data_dir) if data_dir else synthetic.default_dataset()
    shown = Path(output) if output else Path("results") / model / root.name
    run_dir = rundir.check_output(shown)  # a file in the way fails now, not after the fit
    with rundir.locked(run_dir, "the run", _TRAIN_FIX):  # a second train here fails now
        fit_seconds = _fit_and_save(entry, cfg, root, run_dir, progress, echo)
    echo(f"fit in {fit_seconds:.1f} s; run saved to {shown}")
    return shown


def _fit_and_save(
    entry: ModelEntry, cfg: Config, root: Path, run_dir: Path, progress: bool, echo: Echo
) -> float:
    """Fit on ``root``'s good training images; write the run into ``run_dir`` in one commit."""
    model = entry.name
    samples = data.find_samples(root, "train", skip_bad=cfg.data.skip_bad)
    loo = uses_leave_one_out(entry.cls, cfg)
    fit_samples, held_out = _split_holdout(samples, 0.0 if loo else cfg.threshold.holdout, cfg)
    net = build_model(entry, cfg, echo)
    mean, std = _normalization(cfg, net)
    tiler = make_tiler(cfg)
    loader = batch_loader(fit_samples, cfg, mean, std)
    echo(f"training {model} on {len(loader.dataset)} images from {root}")
    start = time.perf_counter()
    net.fit(Batches(loader, tiler, cfg.data.output_size, progress, "fit"))
    fit_seconds = time.perf_counter() - start
    if loo:
        threshold, good = _loo_threshold(net, loader, cfg, tiler, progress)
    else:
        threshold, good = _holdout_threshold(net, held_out, cfg, mean, std, tiler)
    threshold_seconds = time.perf_counter() - start - fit_seconds
    info = net.info()
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    metadata = {
        "model": model,
        "plugin": {"distribution": entry.distribution, "version": entry.version},
        "hamacho_version": hamacho.__version__,
        "config": cfg.to_dict(),
        "normalization": {"mean": list(mean), "std": list(std)},
        "threshold": threshold,
        "dataset": str(root.resolve()),
        "info": info,
        "created": created,
        # the threshold's good-image scores, so `hamacho update`/`merge` can pool them later
        "good_scores": good_scores(good),
        "history": [history_entry("train", root, len(loader.dataset), created)],
    }
    summary = {
        "model": model,
        "dataset": str(root),
        "fit_seconds": round(fit_seconds, 3),
        "threshold_seconds": round(threshold_seconds, 3),  # scoring good images for it
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "train_images": len(loader.dataset),
        "holdout_images": len(held_out),
        "skipped_images": len(getattr(loader.dataset, "skipped", [])),
        "threshold": threshold,
        **info,
    }
    save_run(run_dir, net, metadata, cfg, summary)
    return fit_seconds


def save_run(
    run_dir: Path, net: Model, metadata: dict, cfg: Config, summary: dict, **more: dict
) -> None:
    """Write a run (artifact, config.yaml, train.json, then ``NAME.json`` for each of ``more``)
    as one whole-folder replacement."""
    with rundir.new_run(run_dir, _TRAIN_FIX) as staging:
        artifact.save_artifact(staging / ARTIFACT, net.state_dict(), metadata)
        (staging / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        write_json(staging / "train.json", summary)
        for name, content in more.items():
            write_json(staging / f"{name}.json", content)


def uses_leave_one_out(cls: type[Model], cfg: Config) -> bool:
    """Whether the threshold comes from leave-one-out training scores (nothing withheld)."""
    has_hook = getattr(cls, "training_scores", None) not in (None, Model.training_scores)
    if cfg.threshold.source == "loo" and not has_hook:
        raise ConfigError(
            f"model {cls.name!r} cannot score its training images leave-one-out; set "
            "threshold.source=holdout (or auto)"
        )
    return cfg.threshold.source != "holdout" and has_hook


def _split_holdout(
    samples: list[data.Sample], fraction: float, cfg: Config
) -> tuple[list[data.Sample], list[data.Sample]]:
    n_hold = int(round(len(samples) * fraction)) if fraction > 0 else 0
    if n_hold == 0 or len(samples) - n_hold < 1:
        return samples, []
    generator = torch.Generator().manual_seed(cfg.run.seed)
    order = torch.randperm(len(samples), generator=generator).tolist()
    held = set(order[:n_hold])
    return (
        [s for i, s in enumerate(samples) if i not in held],
        [s for i, s in enumerate(samples) if i in held],
    )


def _normalization(cfg: Config, net: Model) -> tuple[tuple[float, ...], tuple[float, ...]]:
    mean, std = net.normalization()
    return tuple(cfg.data.mean or mean), tuple(cfg.data.std or std)


Threshold = tuple[dict[str, Any] | None, torch.Tensor | None]  # (threshold, its good scores)


def _holdout_threshold(
    net: Model, held_out: list[data.Sample], cfg: Config, mean: Any, std: Any, tiler: Any
) -> Threshold:
    if not held_out:
        return None, None
    loader = batch_loader(held_out, cfg, mean, std)
    scores = torch.cat([predict_batch(net, batch["image"], tiler).scores for batch in loader])
    return threshold_from_scores(
        scores, cfg, f"{len(held_out)} held-out good training images"
    ), scores


def _loo_threshold(net: Model, loader: Any, cfg: Config, tiler: Any, progress: bool) -> Threshold:
    scores = loo_scores(net, loader, cfg, tiler, progress)
    if scores is None:
        return None, None
    n = len(loader.dataset)
    return threshold_from_scores(
        scores, cfg, f"{n} good training images, each scored leave-one-out"
    ), scores


def loo_scores(
    net: Model, loader: Any, cfg: Config, tiler: Any, progress: bool
) -> torch.Tensor | None:
    """``net.training_scores`` of ``loader``'s images, one per image (tiles: the worst tile)."""
    batches = Batches(loader, tiler, cfg.data.output_size, progress, "threshold")
    scores = net.training_scores(batches)
    if scores is not None and tiler is not None:
        scores = per_image_max(scores.flatten(), len(loader.dataset))
    return scores


def good_scores(scores: torch.Tensor | None) -> list[float] | None:
    """Scores as a JSON list (None stays None); non-finite ones are dropped."""
    if scores is None:
        return None
    return [round(float(v), 6) for v in scores.float().cpu().flatten() if math.isfinite(v)]


def history_entry(action: str, root: Path, images: int, when: str) -> dict[str, Any]:
    """One line of a run's history: what was done with which dataset, how many images, when."""
    return {"action": action, "dataset": str(root.resolve()), "images": images, "when": when}


def threshold_from_scores(scores: torch.Tensor, cfg: Config, source: str) -> dict[str, Any]:
    """The threshold dict (value, method, parameter, source) from good-image ``scores``."""
    values = scores.float().cpu().numpy()
    method = cfg.threshold.method
    parameter = cfg.threshold.percentile if method == "percentile" else cfg.threshold.sigma
    value = metrics.threshold_from_normal(values, method, parameter)
    return {"value": float(value), "method": method, "parameter": parameter, "source": source}


# -- load ------------------------------------------------------------------------------------
def load_run(run_dir: str | Path) -> Run:
    """Rebuild the model saved in ``run_dir`` (never unpickles)."""
    run_dir = Path(run_dir)
    path = run_dir / ARTIFACT if run_dir.is_dir() else run_dir
    if not path.exists():
        raise ArtifactError(
            f"no trained model at '{path}'. Train one with `hamacho train --model NAME`"
        )
    tensors, metadata = artifact.load_artifact(path)
    artifact.check_run_metadata(metadata, path)
    name = metadata.get("model", "?")
    try:
        entry = get_registry().get(name)
    except UnknownModelError as exc:
        dist = metadata.get("plugin", {}).get("distribution", "its plugin")
        raise UnknownModelError(f"{exc}. '{path}' needs {dist}: install it") from None
    cfg = config_mod.from_dict(entry.cls.Config, metadata["config"])
    net = entry.cls(cfg.model, make_components(cfg))
    net.load_state_dict(tensors)
    saved = metadata.get("info", {}).get("weights")
    now = net.info().get("weights")
    if saved and now and saved != now:
        raise ArtifactError(
            f"'{path}' was trained with backbone weights {saved} but this machine has {now}. "
            "Supply the same weights (model.weights) or retrain"
        )
    return Run(net, cfg, metadata, path.parent, make_tiler(cfg))


# -- test ------------------------------------------------------------------------------------
def test(
    run_dir: str | Path,
    data_dir: str | Path | None = None,
    write_maps: bool = True,
    progress: bool = False,
    echo: Echo = _quiet,
) -> dict[str, Any]:
    """Evaluate a run on its test split; write metrics.json, scores.csv, maps/ and report.html.

    The files are written aside and moved in with metrics.json last (hamacho.rundir): after a
    crash, a metrics.json in the run means the results beside it are complete.
    """
    path = Path(run_dir)
    if not path.exists():
        load_run(path)  # raises the one-line "no trained model" error
    folder = (path if path.is_dir() else path.parent).resolve()
    with rundir.locked(folder, "test results", _TEST_FIX):  # no train swaps the run meanwhile
        run = load_run(path)
        result = _test_run(run, folder, data_dir, write_maps, progress, echo)
    echo(
        "image AUROC {image_auroc}  pixel AUROC {pixel_auroc}  ({inference_ms_per_image} "
        "ms/image); report: {report}".format(**result, report=run.path / "report.html")
    )
    return result


def _test_run(
    run: Run,
    folder: Path,
    data_dir: str | Path | None,
    write_maps: bool,
    progress: bool,
    echo: Echo,
) -> dict[str, Any]:
    """Score the test split; write the results into ``folder`` in one commit."""
    with rundir.new_results(folder, _TEST_FIX) as staging:
        return evaluate_split(run, staging, data_dir, write_maps, progress, echo)


def evaluate_split(
    run: Run,
    staging: Path,
    data_dir: str | Path | None,
    write_maps: bool,
    progress: bool,
    echo: Echo,
) -> dict[str, Any]:
    """Score ``data_dir``'s test split (default: the run's); write the results into ``staging``."""
    root = Path(data_dir) if data_dir else Path(run.metadata["dataset"])
    # Without --data the folder comes from the run's metadata: say which one is read.
    echo(f"testing on {root}" + ("" if data_dir else " (recorded at training; --data overrides)"))
    samples = data.find_samples(root, "test", skip_bad=run.config.data.skip_bad)
    loader = batch_loader(samples, run.config, run.mean, run.std)
    return evaluate(run, root, loader, staging, write_maps, progress)


def list_models() -> list[dict[str, str]]:
    """Rows for ``hamacho models``."""
    return [
        {
            "name": e.name,
            "distribution": e.distribution,
            "version": e.version,
            "summary": e.cls.summary,
        }
        for e in get_registry().models().values()
    ]
