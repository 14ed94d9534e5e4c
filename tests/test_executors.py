"""--executor ray on a real two-node Ray cluster on 127.0.0.1 (one per module: it is slow to
start), against the local executor: same benchmark rows, same predict rows, killed workers."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from hamacho import engine
from hamacho.cli import main

from .conftest import FAST

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before ray: keep 127.0.0.1
pytestmark = pytest.mark.slow
TIMINGS = {"fit_seconds", "inference_ms_per_image", "peak_rss_mb", "cell_seconds"}


@pytest.fixture(scope="module")
def cluster():
    """A head and a worker node, one CPU each, small object stores, no dashboard."""
    cluster_utils = pytest.importorskip("ray.cluster_utils")
    import ray

    saved = dict(os.environ)
    os.environ["HAMACHO_OFFLINE"] = "1"  # the nodes' workers inherit this
    node = {"num_cpus": 1, "object_store_memory": 80 * 2**20, "node_ip_address": "127.0.0.1"}
    head = {**node, "include_dashboard": False}
    nodes = cluster_utils.Cluster(initialize_head=True, head_node_args=head)
    worker = nodes.add_node(**node)
    ray.init(address=nodes.address, log_to_driver=False, logging_level="warning")
    try:
        yield nodes, worker
    finally:
        ray.shutdown()
        nodes.shutdown()
        os.environ.clear()
        os.environ.update(saved)


def _rows(folder: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((folder / "results.csv").open()))


def _same_but_timings(want: dict[str, str], got: dict[str, str], local: Path, ray: Path) -> None:
    same = set(want) - TIMINGS - {"run_dir"}
    assert {k: want[k] for k in same} == {k: got[k] for k in same}
    assert got["run_dir"] == want["run_dir"].replace(str(local), str(ray))


def _proc_argv(pid: int) -> list[bytes]:
    try:
        return [a for a in (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0") if a]
    except OSError:  # gone (a zombie's cmdline reads empty)
        return []


def _parent(pid: int) -> int:
    stat = (Path("/proc") / str(pid) / "stat").read_text()
    return int(stat.rpartition(")")[2].split()[1])  # the field after the state


def _cell_processes(output: Path) -> dict[int, Path]:
    """pid -> cell folder of each running cell process (runner.cell_main) under ``output``."""
    found = {}
    for proc in Path("/proc").iterdir():
        argv = _proc_argv(int(proc.name)) if proc.name.isdigit() else []
        if len(argv) == 4 and b"cell_main" in argv[2] and argv[3].startswith(bytes(output)):
            found[int(proc.name)] = Path(argv[3].decode()).parent
    return found


def _new_cell(output: Path, seen: set[int], driver: subprocess.Popen, log: str) -> tuple:
    """(pid, folder) of a cell process not in ``seen``, or () while none; fail if the driver
    ended before its cells did."""
    if driver.poll() is not None:
        pytest.fail(f"the driver ended early ({driver.returncode}): {Path(log).read_text()}")
    return next(((p, f) for p, f in _cell_processes(output).items() if p not in seen), ())


def _until(condition, what: str, seconds: float = 180):
    """``condition()``'s first truthy value, polled; fail naming ``what`` after ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"gave up after {seconds:g} s waiting for {what}")


def test_ray_benchmark_survives_a_killed_node_and_worker_then_resumes(
    cluster, tiny_mvtec, tmp_path
):
    """The cell whose node dies mid-run is retried and equals local; the cell whose worker dies
    every try is recorded as lost; the resume runs only that one again, and then all equal local."""
    nodes, _ = cluster
    sets = [arg for item in [*FAST, "model.n_features=16"] for arg in ("--set", item)]
    args = ["benchmark", "--models", "padim", "--data", str(tiny_mvtec), *sets]
    args += ["--backbones", "resnet18:layer9@none,resnet18@none"]  # layer9 does not exist
    local, out = tmp_path / "local", tmp_path / "ray"
    assert CliRunner().invoke(main, [*args, "--output", str(local)]).exit_code == 1
    want = _rows(local)
    lost, retried = (out / Path(row["run_dir"]).relative_to(local) for row in want)

    # --cpus-per-cell 2: only the 2-CPU node added here fits a cell, so every try runs on it
    spare = {"num_cpus": 2, "object_store_memory": 80 * 2**20, "node_ip_address": "127.0.0.1"}
    node = nodes.add_node(**spare)
    on_ray = [*args, "--output", str(out), "--executor", "ray", "--ray-address", nodes.address]
    argv = [sys.executable, "-m", "hamacho", *on_ray, "--cpus-per-cell", "2"]
    with (tmp_path / "driver.log").open("w") as log:
        driver = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        seen: set[int] = set()
        node_kills = worker_kills = 0
        while node_kills < 1 or worker_kills < 3:
            pid, folder = _until(lambda: _new_cell(out, seen, driver, log.name), "a cell to start")
            seen.add(pid)
            worker = _parent(pid)  # the Ray worker running the cell's task
            if folder == retried and not node_kills:
                assert _parent(worker) == node.all_processes["raylet"][0].process.pid
                nodes.remove_node(node, allow_graceful=False)  # the node crashes
                node = nodes.add_node(**spare)
                node_kills += 1
            elif folder == lost:
                os.kill(worker, signal.SIGKILL)
                worker_kills += 1
            _until(
                lambda pid=pid: not _proc_argv(pid), "the cell's process to end (with its worker)"
            )
        assert driver.wait(timeout=300) == 1, Path(log.name).read_text()
    finally:
        driver.kill()  # nothing if it ended
        if node in nodes.worker_nodes:
            nodes.remove_node(node)
    got = _rows(out)
    assert [r["status"] for r in got] == ["failed", "ok"]  # nothing silently missing
    assert got[0]["error"].startswith("lost on Ray 3 times: ")
    _same_but_timings(want[1], got[1], local, out)

    on_ray += ["--cpus-per-cell", "1"]  # the spare node is gone; cpus are not a cell setting
    again = CliRunner().invoke(main, on_ray)  # runs the lost cell, not the finished one
    assert again.exit_code == 1
    got = _rows(out)
    assert [(r["status"], r["cached"]) for r in got] == [("failed", "False"), ("ok", "True")]
    for a, b in zip(want, got, strict=True):
        _same_but_timings({**a, "cached": b["cached"]}, b, local, out)
    assert (out / "results.md").read_text().count("failed") >= 1
    assert (out / "results.png").stat().st_size > 0


def _scorer_pids() -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            title = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if proc.name.isdigit() and title.startswith(b"ray::") and b"_Scorer" in title:
            pids.append(int(proc.name))
    return pids


def test_ray_predict_rows_and_maps_equal_local_with_a_worker_killed(
    cluster, tiny_mvtec, tmp_path, monkeypatch
):
    from PIL import Image

    from hamacho.executors.ray import RayExecutor

    engine.train("padim", tiny_mvtec, None, [*FAST, "model.n_features=16"], tmp_path / "r")
    sources = sorted((tiny_mvtec / "test").rglob("*.png"))
    for i in range(48):  # distinct files (a lost or doubled row shows), 12 names in 4 folders
        folder = tmp_path / "images" / f"{i % 4}"  # (so map names clash: 000.png, 1_000.png)
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(sources[i % len(sources)], folder / f"{i // 4:03d}.png")
    (tmp_path / "images" / "broken.png").write_bytes(b"not a png")
    monkeypatch.chdir(tmp_path)  # relative paths, while the Ray workers started elsewhere
    inputs = ["images", "missing.png"]
    local = list(engine.predict("r", inputs, maps_dir="maps", batch_size=2))

    killed: list[int] = []
    rows = []
    with RayExecutor(workers=2) as executor:  # joins the module's cluster
        for row in executor.predict("r", inputs, batch_size=2, maps_dir="ray/maps"):
            rows.append(row)
            if len(rows) == 1:  # one of the two actors dies mid-job; Ray replaces it
                killed = _scorer_pids()[:1]
                for pid in killed:
                    os.kill(pid, signal.SIGKILL)
    assert killed, "no Ray Data actor was running to kill"
    assert len(rows) == len(local) == 50
    by_path = {r["path"]: r for r in rows}
    assert len(by_path) == 50  # each input exactly once
    for want in local:
        got = by_path[want["path"]]
        assert set(got) == set(want)
        if "score" in want:
            assert got["score"] == pytest.approx(want["score"], abs=1e-5)
            assert got["map"] == f"ray/{want['map']}"  # the same name as local gives it
            panels = [np.asarray(Image.open(r["map"])) for r in (want, got)]
            assert np.array_equal(*panels)  # one model, the same pixels: the same panel
        same = set(want) - {"score", "map"}
        assert {k: got[k] for k in same} == {k: want[k] for k in same}
    assert sum("error" in r for r in rows) == 2  # the broken file and the missing path
    assert len(list(Path("ray/maps").iterdir())) == len(list(Path("maps").iterdir())) == 48


def test_ray_train_many_datasets_in_parallel(cluster, tiny_mvtec, tmp_path):
    nodes, _ = cluster
    second = shutil.copytree(tiny_mvtec, tmp_path / "gadget")
    sets = [arg for item in [*FAST, "model.n_features=16"] for arg in ("--set", item)]
    args = ["train", "--model", "padim", "--data", str(tiny_mvtec), str(second), *sets]
    args += ["-o", str(tmp_path / "runs"), "--executor", "ray", "--ray-address", nodes.address]
    start = time.perf_counter()
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert time.perf_counter() - start < 120
    folders = sorted(Path(line) for line in result.stdout.split())
    assert folders == [tmp_path / "runs" / "gadget", tmp_path / "runs" / "widget"]
    for folder in folders:
        assert (folder / "model.safetensors").exists()
        assert json.loads((folder / "train.json").read_text())["train_images"] == 12


def test_executor_ray_without_ray_says_what_to_install(tiny_mvtec):
    code = "import sys; sys.modules['ray'] = None; from hamacho.cli import main; main()"
    argv = [sys.executable, "-c", code, "predict", "--run", "x", "y.png", "--executor", "ray"]
    proc = subprocess.run(argv, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --executor ray needs Ray: pip install 'hamacho[ray]'"


def test_predict_output_jsonl_and_parquet_hold_the_stdout_rows(tiny_mvtec, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    run = engine.train("padim", tiny_mvtec, None, [*FAST, "model.n_features=16"], tmp_path / "r")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    args = ["predict", "--run", str(run), str(tiny_mvtec / "test"), str(tmp_path / "broken.png")]
    shown = CliRunner().invoke(main, args)
    assert shown.exit_code == 1  # one error row
    rows = [json.loads(line) for line in shown.stdout.splitlines()]
    assert len(rows) == 11 and sum("error" in r for r in rows) == 1
    for name in ("rows.jsonl", "rows.parquet"):
        result = CliRunner().invoke(main, [*args, "--output", str(tmp_path / name)])
        assert result.exit_code == 1 and result.stdout == ""
    lines = (tmp_path / "rows.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == rows
    table = pq.read_table(tmp_path / "rows.parquet").to_pylist()
    assert [{k: v for k, v in r.items() if v is not None} for r in table] == [
        {k: v for k, v in r.items() if v is not None} for r in rows
    ]
    bad = CliRunner().invoke(main, [*args, "--output", str(tmp_path / "rows.csv")])
    assert bad.exit_code == 2 and "must end in .jsonl or .parquet" in bad.output
