"""A run folder is one transaction with one writer; failures are one line (issue 12, items 4-7)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from hamacho.cli import main
from hamacho.components.synthetic import make_synthetic_dataset

from .conftest import FAST

# Real processes on a bigger set: a fit of seconds and a 7 MB artifact leave room to kill in.
BIG = [*FAST, "data.image_size=128", "model.coreset_ratio=1.0"]


def _sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def _one_line_error(result) -> str:
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def _consistent(run_dir: Path) -> dict:
    """Assert ``run_dir`` loads and its files agree with its artifact; return its train.json."""
    from hamacho.engine import load_run

    loaded = load_run(run_dir)
    summary = json.loads((run_dir / "train.json").read_text())
    assert summary["threshold"] == loaded.metadata["threshold"]
    assert yaml.safe_load((run_dir / "config.yaml").read_text()) == loaded.metadata["config"]
    return summary


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _leftovers(run_dir: Path) -> list[str]:
    beside = [p.name for p in run_dir.parent.glob(f".{run_dir.name}.*") if p.suffix != ".lock"]
    return beside + [p.name for p in run_dir.glob(".*")]


@pytest.fixture(scope="module")
def trained(tiny_mvtec, tmp_path_factory):
    """A tiny run with a threshold at the 50th percentile and --no-maps test results."""
    out = tmp_path_factory.mktemp("reliability") / "run"
    args = ("--data", str(tiny_mvtec), "-o", str(out))
    sets = _sets(*FAST, "threshold.percentile=50")
    assert run("train", "--model", "patchcore", *args, *sets).exit_code == 0
    assert run("test", "--run", str(out), "--no-maps").exit_code == 0
    return out


@pytest.fixture
def old_run(trained, tmp_path):
    """A private copy of ``trained`` to overwrite."""
    return Path(shutil.copytree(trained, tmp_path / "run"))


@pytest.fixture(scope="module")
def big_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("big") / "part"
    return make_synthetic_dataset(root, n_train=24, n_test_good=10, n_test_defect=10, size=128)


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a tmpfs of a given size (skips where the sandbox cannot mount); remount_ro() it."""
    mounted: list[Path] = []

    def make(name: str, size: str) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        argv = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)]
        if shutil.which("mount") is None or os.geteuid() != 0:
            pytest.skip(
                "needs root and mount(8) for a read-only / full tmpfs (chmod stops no root)"
            )
        done = subprocess.run(argv, capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield make
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], check=False)


def _remount_ro(folder: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)


# -- 7. one line, never a traceback ----------------------------------------------------------
def test_config_folder_is_one_line(tiny_mvtec, tmp_path):
    result = run("train", "-m", "padim", "--data", str(tiny_mvtec), "--config", str(tmp_path))
    assert result.exit_code == 2
    assert f"'{tmp_path}' is a folder" in _one_line_error(result)


def test_config_not_utf8_is_one_line(tiny_mvtec, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_bytes("model:\n  backbone: résnet18\n".encode("latin-1"))
    result = run("train", "-m", "padim", "--data", str(tiny_mvtec), "--config", str(config))
    assert result.exit_code == 2
    line = _one_line_error(result)
    assert f"'{config}' is not UTF-8" in line and "0xe9" in line and "Save it as UTF-8" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_fails_before_the_backbone(tiny_mvtec, tmp_path):
    args = ("--data", str(tiny_mvtec), "-o", str(tmp_path / "r"), *_sets(*FAST, "run.device=cuda"))
    result = run("train", "-m", "patchcore", *args)
    assert result.exit_code == 2
    assert "run.device=cuda, but this machine has no CUDA device" in _one_line_error(result)
    assert "random weights" not in result.stderr  # the backbone was never built


def test_device_bogus_is_one_line(tiny_mvtec):
    result = run("train", "-m", "patchcore", "--data", str(tiny_mvtec), "--set", "run.device=gpu")
    assert result.exit_code == 2
    assert "run.device must be auto, cpu, cuda, cuda:N or mps, got 'gpu'" in _one_line_error(result)


@pytest.mark.parametrize("where", ["file", "under_file"])
def test_output_file_fails_before_fit(tiny_mvtec, tmp_path, where):
    blocker = tmp_path / "taken.txt"
    blocker.write_text("keep me")
    out = blocker if where == "file" else blocker / "run"
    result = run("train", "-m", "patchcore", "--data", str(tiny_mvtec), "-o", str(out))
    assert result.exit_code == 1
    line = _one_line_error(result)
    assert f"'{out}'" in line and "Choose a new or existing folder" in line
    assert "training" not in result.stderr  # refused before the fit
    assert blocker.read_text() == "keep me"


def test_output_that_cannot_be_replaced_whole_fails_before_fit(
    tiny_mvtec, tmp_path, tmpfs, monkeypatch
):
    mount = tmpfs("mnt", "1m")
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    for out, says in ((mount, "is a mount point"), (Path("."), "is the current folder")):
        result = run("train", "-m", "patchcore", "--data", str(tiny_mvtec), "-o", str(out))
        assert result.exit_code == 1
        line = _one_line_error(result)
        assert f"output '{out}' {says}" in line and "Choose" in line
        assert "training" not in result.stderr


def test_train_on_read_only_fs_fails_before_fit(tiny_mvtec, tmpfs):
    folder = tmpfs("ro", "1m")
    _remount_ro(folder)
    out = folder / "run"
    result = run("train", "-m", "patchcore", "--data", str(tiny_mvtec), "-o", str(out))
    assert result.exit_code == 1
    line = _one_line_error(result)
    assert f"'{out}'" in line and "read-only" in line and "--output" in line
    assert "training" not in result.stderr


def test_test_on_read_only_fs_is_one_line(trained, tmpfs):
    folder = tmpfs("ro", "4m")
    run_dir = Path(shutil.copytree(trained, folder / "run"))
    _remount_ro(folder)
    before = _snapshot(run_dir)
    result = run("test", "--run", str(run_dir))
    assert result.exit_code == 1
    line = _one_line_error(result)
    assert f"'{run_dir}'" in line and "read-only" in line and "Copy the run folder" in line
    assert _snapshot(run_dir) == before


def test_predict_maps_on_read_only_fs_is_one_line(trained, tiny_mvtec, tmpfs):
    folder = tmpfs("ro", "1m")
    _remount_ro(folder)
    image = next((tiny_mvtec / "test" / "good").iterdir())
    result = run("predict", "--run", str(trained), str(image), "--maps", str(folder / "maps"))
    assert result.exit_code == 1
    line = _one_line_error(result)
    assert f"'{folder / 'maps'}'" in line and "read-only" in line and "--maps" in line
    assert result.stdout == ""


def test_predict_maps_under_a_file_is_one_line(trained, tiny_mvtec, tmp_path):
    blocker = tmp_path / "taken.txt"
    blocker.write_text("keep me")
    image = next((tiny_mvtec / "test" / "good").iterdir())
    result = run("predict", "--run", str(trained), str(image), "--maps", str(blocker / "maps"))
    assert result.exit_code == 1
    assert f"is under '{blocker}', which is a file" in _one_line_error(result)


def test_test_with_disk_full_keeps_the_old_results(trained, tmpfs):
    used = sum(p.stat().st_size for p in trained.rglob("*") if p.is_file())
    folder = tmpfs("full", f"{used // 1024 + 64}k")  # room for the run, not for 10 heat maps
    run_dir = Path(shutil.copytree(trained, folder / "run"))
    before = _snapshot(run_dir)
    result = run("test", "--run", str(run_dir))
    assert result.exit_code == 1
    line = _one_line_error(result)
    assert f"'{run_dir}'" in line and "disk is full" in line and "old results are unchanged" in line
    assert _snapshot(run_dir) == before and not _leftovers(run_dir)


def test_train_with_disk_full_keeps_the_old_run(trained, tiny_mvtec, tmpfs):
    used = sum(p.stat().st_size for p in trained.rglob("*") if p.is_file())
    folder = tmpfs("full", f"{used // 1024 + 16}k")  # no room for a second artifact
    run_dir = Path(shutil.copytree(trained, folder / "run"))
    before = _snapshot(run_dir)
    args = ("--data", str(tiny_mvtec), "-o", str(run_dir), *_sets(*FAST))
    result = run("train", "-m", "patchcore", *args)
    assert result.exit_code == 1
    line = _one_line_error(result)
    assert f"'{run_dir}'" in line and "disk is full" in line and "old run is unchanged" in line
    assert _snapshot(run_dir) == before and not _leftovers(run_dir)


# -- 4. a run folder is one transaction --------------------------------------------------------
def test_train_replaces_the_whole_run_and_clears_leftovers(old_run, tiny_mvtec):
    old = _consistent(old_run)
    (old_run / "notes.txt").write_text("mine")  # not hamacho's: carried over
    (old_run / "maps" / "good").mkdir(parents=True)
    (old_run / "maps" / "good" / "000.png").write_bytes(b"old")
    (old_run / "model.onnx").write_bytes(b"the old model, exported")  # would score stale
    (old_run / ".model.safetensors.123.abcdef01.tmp").write_bytes(b"killed save")
    killed = old_run.parent / f".{old_run.name}.tmp-123-abcdef01"
    killed.mkdir()
    args = ("--data", str(tiny_mvtec), "-o", str(old_run), *_sets(*FAST))
    assert run("train", "-m", "patchcore", *args).exit_code == 0
    new = _consistent(old_run)
    assert new["threshold"] != old["threshold"]
    assert sorted(p.name for p in old_run.iterdir()) == [
        "config.yaml",
        "model.safetensors",
        "notes.txt",
        "train.json",
    ]  # no metrics.json / scores.csv / report.html / maps of the old model
    assert (old_run / "notes.txt").read_text() == "mine"
    assert not _leftovers(old_run)


def test_test_results_are_replaced_as_a_set(old_run):
    stale = old_run / "maps" / "crack" / "old.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    (old_run / ".results.tmp-123-abcdef01").mkdir()  # a killed test's staging folder
    assert run("test", "--run", str(old_run)).exit_code == 0
    assert not stale.exists() and len(list((old_run / "maps").rglob("*.png"))) == 10
    assert not _leftovers(old_run)
    assert run("test", "--run", str(old_run), "--no-maps").exit_code == 0
    assert not (old_run / "maps").exists()  # no maps beside results that have none


def test_without_renameat2_the_two_rename_swap_and_its_recovery(old_run, monkeypatch):
    from hamacho import rundir

    monkeypatch.setattr(rundir, "_exchange", lambda a, b: False)  # as on macOS
    with rundir.locked(old_run, "the run", "fix"), rundir.new_run(old_run, "fix") as staging:
        shutil.copy2(old_run / "model.safetensors", staging / "model.safetensors")
        (staging / "config.yaml").write_text((old_run / "config.yaml").read_text())
        (staging / "train.json").write_text((old_run / "train.json").read_text())
    assert not (old_run / "metrics.json").exists() and not _leftovers(old_run)
    _consistent(old_run)
    # killed between the two renames: the run is at .NAME.old-*, a half staging folder beside it
    backup = old_run.parent / f".{old_run.name}.old-123-abcdef01"
    old_run.rename(backup)
    (old_run.parent / f".{old_run.name}.tmp-123-abcdef01").mkdir()
    rundir.recover(old_run)
    _consistent(old_run)
    assert not _leftovers(old_run)


# -- 5. one writer at a time -------------------------------------------------------------------
def test_locked_run_refuses_train_and_test_naming_the_holder(old_run, tiny_mvtec):
    from hamacho import rundir

    with rundir.locked(old_run, "the run", "fix"):
        for argv in (
            [
                "train",
                "-m",
                "patchcore",
                "--data",
                str(tiny_mvtec),
                "-o",
                str(old_run),
                *_sets(*FAST),
            ],
            ["test", "--run", str(old_run)],
        ):
            result = run(*argv)
            assert result.exit_code == 1
            line = _one_line_error(result)
            assert f"another hamacho process (pid {os.getpid()}" in line


def _as_in_a_terminal() -> None:
    """Ctrl-C's default action in the child: a background pytest may run with SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class _Hamacho:
    """A real ``hamacho`` subprocess; its stderr lines are collected as they come."""

    def __init__(self, *args: str) -> None:
        argv = [sys.executable, "-m", "hamacho", *args]
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=_as_in_a_terminal,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float = 300) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            if any(text in line for line in self.lines):
                return True
            time.sleep(0.001)
        return any(text in line for line in self.lines)

    def finish(self, timeout: float = 300) -> int:
        self.proc.wait(timeout)
        self._reader.join(10)
        return self.proc.returncode


def _train(data_dir: Path, out: Path, settings: list[str]) -> _Hamacho:
    return _Hamacho(
        "train", "-m", "patchcore", "--data", str(data_dir), "-o", str(out), *_sets(*settings)
    )


@pytest.mark.slow
def test_two_trains_at_once_second_names_the_first(old_run, big_data, tiny_mvtec):
    first = _train(big_data, old_run, BIG)
    try:
        assert first.wait_for("training patchcore"), first.lines  # it holds the lock now
        os.kill(first.proc.pid, signal.SIGSTOP)
        second = _train(tiny_mvtec, old_run, FAST)
        assert second.finish() == 1
        errors = [line for line in second.lines if line.startswith("error: ")]
        assert len(errors) == 1 and f"(pid {first.proc.pid}," in errors[0], second.lines
    finally:
        os.kill(first.proc.pid, signal.SIGCONT)
    assert first.finish() == 0, first.lines
    assert _consistent(old_run)["dataset"] == str(big_data)  # the first one's run, whole


# -- 6. real kills; SIGINT -----------------------------------------------------------------------
def _fresh(run_dir: Path, since_ns: int) -> set[str]:
    """Which run files this train has written so far, wherever it writes them ("saving": begun)."""
    names = set()
    for folder in [run_dir, *run_dir.parent.glob(f".{run_dir.name}.tmp-*")]:
        if folder != run_dir:
            names.add("saving")  # the staging folder exists
        for name in ("model.safetensors", "config.yaml", "train.json"):
            try:
                if (folder / name).stat().st_mtime_ns > since_ns:
                    names.add(name)
            except OSError:
                pass
        if any(folder.glob(".model.safetensors.*.tmp")):
            names.add("saving")
    return names


def _kill_when(process: _Hamacho, condition, seconds: float) -> bool:
    """SIGSTOP ``process`` the moment ``condition()`` holds (or after ``seconds``), then SIGKILL."""
    deadline = time.monotonic() + seconds
    hit = False
    try:
        while process.proc.poll() is None and time.monotonic() < deadline:
            if condition():
                os.kill(process.proc.pid, signal.SIGSTOP)  # freeze exactly here
                hit = True
                break
            time.sleep(0.0005)
    finally:
        if process.proc.poll() is None:
            process.proc.kill()
        process.finish()
    return hit


KILL_POINTS = {
    "fit": lambda seen: False,  # 1 s after the fit started
    "save": lambda seen: "saving" in seen,
    "after_model": lambda seen: "model.safetensors" in seen and "config.yaml" not in seen,
    # all three written, not yet swapped in (the few ms of fsync; in a staging folder only)
    "before_commit": lambda seen: "train.json" in seen and "saving" in seen,
}


@pytest.mark.slow
@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkill_leaves_the_old_or_the_new_run(old_run, big_data, point):
    old = _consistent(old_run)
    since = time.time_ns()
    train = _train(big_data, old_run, BIG)
    assert train.wait_for("training patchcore"), train.lines
    seconds = 1.0 if point == "fit" else 300
    hit = _kill_when(train, lambda: KILL_POINTS[point](_fresh(old_run, since)), seconds)
    seen = _fresh(old_run, since)
    print(f"kill point {point}: hit={hit} (exit {train.proc.returncode}), written {sorted(seen)}")
    now = _consistent(old_run)
    if now["dataset"] == old["dataset"]:  # the old run, whole
        assert now == old and (old_run / "metrics.json").exists()
    else:  # the new run, whole, without the old model's results
        assert now["dataset"] == str(big_data) and not (old_run / "metrics.json").exists()


def _results(run_dir: Path, since_ns: int) -> set[str]:
    """Which test results this test has written so far ("staged": its own folder exists)."""
    names = set() if (run_dir / "metrics.json").exists() else {"no_metrics"}
    for folder in [run_dir, *run_dir.glob(".results.tmp-*")]:
        if folder != run_dir:
            names.add("staged")
        for name in ("metrics.json", "scores.csv", "report.html", "maps"):
            try:
                if (folder / name).stat().st_mtime_ns > since_ns:
                    names.add(name)
            except OSError:
                pass
    return names


RESULT_KILL_POINTS = {
    "writing": lambda seen: "staged" in seen or "metrics.json" in seen,
    # moving in (metrics.json gone until the rest is in); written in place: metrics but no report
    "moving": lambda seen: (
        {"staged", "no_metrics"} <= seen
        or ("maps" in seen and "report.html" not in seen and "staged" not in seen)
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("point", list(RESULT_KILL_POINTS))
def test_sigkill_during_test_leaves_whole_results_or_none(old_run, big_data, point):
    since = time.time_ns()
    tester = _Hamacho("test", "--run", str(old_run), "--data", str(big_data))
    hit = _kill_when(tester, lambda: RESULT_KILL_POINTS[point](_results(old_run, since)), 300)
    seen = _results(old_run, since)
    print(
        f"test kill point {point}: hit={hit} (exit {tester.proc.returncode}), seen {sorted(seen)}"
    )
    _consistent(old_run)
    if (old_run / "metrics.json").exists():  # then the results beside it are one whole set
        metrics = json.loads((old_run / "metrics.json").read_text())
        rows = list(csv.DictReader((old_run / "scores.csv").open()))
        assert len(rows) == sum(metrics["images"].values())
        drawn = len(rows) if metrics["dataset"] == str(big_data) else 0  # the old test: --no-maps
        assert len(list(old_run.glob("maps/*/*.png"))) == drawn
        assert (old_run / "report.html").exists()


@pytest.mark.slow
def test_sigint_exits_130_with_one_line_and_keeps_the_old_run(old_run, big_data):
    old = _consistent(old_run)
    before = _snapshot(old_run)
    train = _train(big_data, old_run, BIG)
    assert train.wait_for("training patchcore"), train.lines
    # Ctrl-C in the fit whatever the machine's load: frozen, signalled, resumed into the handler
    os.kill(train.proc.pid, signal.SIGSTOP)
    train.proc.send_signal(signal.SIGINT)
    os.kill(train.proc.pid, signal.SIGCONT)
    assert train.finish() == 130, train.lines
    assert (
        train.lines[-1] == "error: interrupted (Ctrl-C); run folders keep their last complete state"
    )
    assert not any("Traceback" in line for line in train.lines)
    assert _consistent(old_run) == old and _snapshot(old_run) == before
    assert not _leftovers(old_run)
