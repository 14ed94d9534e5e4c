"""``hamacho serve`` against a real uvicorn process on a free loopback port."""

from __future__ import annotations

import base64
import fcntl
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

import hamacho
from hamacho.cli import main
from hamacho.components import visualize
from hamacho.errors import UsageError
from hamacho.plugins import reset_registry
from hamacho.serve.cli import parse_runs

from .conftest import API_FAST, fake_dist, need_chromium

# data.max_pixels: so a 200 x 200 image trips the run's decompression-bomb guard
FAST = {**API_FAST, "data.max_pixels": 20_000}
KEY = "s3cret"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def _server(*args: str):
    """``python -m hamacho serve ARGS`` on a free port; yields (process, base URL)."""
    port = _free_port()
    cmd = [sys.executable, "-m", "hamacho", "serve", "--port", str(port), *args]
    log = open(os.devnull, "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180  # model load on a loaded machine
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited {proc.returncode}: {proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not become healthy"
            time.sleep(0.2)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def run_dir(tiny_mvtec, tmp_path_factory):
    out = tmp_path_factory.mktemp("serve") / "widget"
    with pytest.MonkeyPatch.context() as mp:  # module scope: the autouse fixture is per test
        mp.setenv("HAMACHO_OFFLINE", "1")
        hamacho.train("patchcore", data=tiny_mvtec, output=out, overrides=FAST)
    return out


@pytest.fixture(scope="module")
def detector(run_dir):
    return hamacho.load(run_dir)


@pytest.fixture(scope="module")
def url(run_dir):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HAMACHO_OFFLINE", "1")
        args = ["--run", str(run_dir), "--max-batch", "8", "--max-wait-ms", "100"]
        with _server(*args, "--max-upload-mb", "1") as (_, base):
            yield base


def _images(tiny_mvtec) -> list[Path]:
    return sorted((tiny_mvtec / "test").rglob("*.png"))


def _predict(url: str, *paths: Path, query: str = "") -> httpx.Response:
    files = [("file", (p.name, p.read_bytes(), "image/png")) for p in paths]
    return httpx.post(f"{url}/v1/models/widget/predict{query}", files=files, timeout=60)


def _metrics(url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"{url}/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_health_ready_and_models(url, detector):
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{url}/readyz").json() == {"status": "ready", "models": ["widget"]}
    (info,) = httpx.get(f"{url}/v1/models").json()
    assert info["name"] == "widget" and info["model"] == "patchcore"
    assert info["backbone"] == "resnet18" and info["image_size"] == 64
    assert info["threshold"] == detector.threshold


def test_predict_multipart_and_raw_body_equal_the_python_api(url, detector, tiny_mvtec):
    path = _images(tiny_mvtec)[-1]
    expected = detector.predict(path)
    (row,) = _predict(url, path).json()["results"]
    assert row == {
        "filename": path.name,
        "score": pytest.approx(expected.score, rel=1e-6),
        "is_anomalous": expected.is_anomalous,
        "threshold": detector.threshold,
    }
    raw = httpx.post(
        f"{url}/v1/models/widget/predict?filename=part.png",
        content=path.read_bytes(),
        headers={"Content-Type": "image/png"},
    )
    assert raw.status_code == 200
    assert raw.json()["results"][0]["filename"] == "part.png"
    assert raw.json()["results"][0]["score"] == pytest.approx(expected.score, rel=1e-6)


def test_maps_true_adds_the_overlay_predict_draws(url, detector, tiny_mvtec):
    first, second = _images(tiny_mvtec)[:2]
    rows = _predict(url, first, second, query="?maps=true").json()["results"]
    assert [r["filename"] for r in rows] == [first.name, second.name]
    png = Image.open(io.BytesIO(base64.b64decode(rows[0]["map_png"])))
    assert png.format == "PNG"
    image = np.asarray(Image.open(first).convert("RGB"))
    result = detector.predict(first)
    # input | overlay | predicted region, from the same visualize.overlay_panel predict uses
    panel = visualize.overlay_panel(image, result.map, None, result.threshold)
    assert png.size == (panel.shape[1], panel.shape[0]) == (3 * image.shape[1], image.shape[0])
    assert np.abs(np.asarray(png).astype(int) - panel).max() <= 1  # batched float rounding
    assert "map_png" not in _predict(url, first).json()["results"][0]


def test_concurrent_requests_are_batched_and_match_unbatched_calls(url, detector, tiny_mvtec):
    paths = _images(tiny_mvtec)[:8]
    before = _metrics(url)
    rows: dict[Path, dict] = {}

    def call(path: Path) -> None:
        rows[path] = _predict(url, path).json()["results"][0]

    threads = [threading.Thread(target=call, args=(p,)) for p in paths]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    singles = [detector.predict(p) for p in paths]  # one image per call: no batching
    assert len({round(s.score, 4) for s in singles}) > 1  # a mix-up of images would show
    for path, single in zip(paths, singles, strict=True):
        # batched convolutions round differently from single-image ones (as in test_api)
        assert rows[path]["score"] == pytest.approx(single.score, rel=1e-4)
        assert rows[path]["is_anomalous"] == single.is_anomalous
    after = _metrics(url)
    labels = (("model", "widget"),)
    calls, images = (
        after[(name, labels)] - before.get((name, labels), 0)
        for name in ("hamacho_batch_size_count", "hamacho_batch_size_sum")
    )
    assert images == 8 and calls < 8  # some requests shared a model call


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` pixels (a decompression bomb's header)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


def _png(size: tuple[int, int], color: tuple[int, int, int] = (90, 120, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_bad_inputs_get_their_status_and_never_harm_the_service(url, tiny_mvtec):
    good = _images(tiny_mvtec)[0].read_bytes()
    endpoint = f"{url}/v1/models/widget/predict"

    def post(name: str, content: bytes, kind: str = "image/png") -> httpx.Response:
        return httpx.post(endpoint, files=[("file", (name, content, kind))], timeout=60)

    truncated = post("cut.png", good[: len(good) // 2])
    assert truncated.status_code == 400 and "cut.png" in truncated.json()["error"]
    assert post("notes.png", b"just some text\n").status_code == 415
    text = httpx.post(endpoint, content=b"hello", headers={"Content-Type": "text/plain"})
    assert text.status_code == 415 and "content type" in text.json()["error"]
    bomb = post("bomb.png", _png_header_only(50_000, 50_000))  # PIL's own limit
    assert bomb.status_code == 413 and "max_pixels" in bomb.json()["error"]
    big = post("big.png", _png((200, 200)))  # over the run's data.max_pixels=20000
    assert big.status_code == 413 and "data.max_pixels=20,000" in big.json()["error"]
    assert post("big.png", b"\0" * (2 * 2**20)).status_code == 413  # > --max-upload-mb 1

    def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(40):
            yield b"\0" * 65536

    chunked = httpx.post(endpoint, content=chunks(), headers={"Content-Type": "image/png"})
    assert chunked.status_code == 413
    empty = httpx.post(endpoint, files={"other": ("a.png", good, "image/png")})
    assert empty.status_code == 400 and "'file'" in empty.json()["error"]
    unknown = httpx.post(f"{url}/v1/models/nope/predict", files={"file": ("a.png", good)})
    assert unknown.status_code == 404 and "served: widget" in unknown.json()["error"]
    maybe = httpx.post(f"{endpoint}?maps=perhaps", files={"file": ("a.png", good)})
    assert maybe.status_code == 400 and "maps" in maybe.json()["error"]
    assert post("ok.png", good).status_code == 200  # still serving


def test_too_large_is_refused_before_the_body_is_read(url):
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        head = (
            "POST /v1/models/widget/predict HTTP/1.1\r\nHost: x\r\n"
            "Content-Type: image/png\r\nContent-Length: 104857600\r\n\r\n"
        )
        sock.sendall(head.encode() + b"\0" * 1024)  # 1 KiB of the promised 100 MiB
        reply = b""
        while b"max-upload-mb" not in reply:  # the head and the body may come in two reads
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    text = reply.decode(errors="replace")
    assert text.startswith("HTTP/1.1 413") and "max-upload-mb" in text


def test_metrics_count_requests_errors_latency_batches_and_load_time(url, tiny_mvtec):
    _predict(url, _images(tiny_mvtec)[0])
    httpx.post(f"{url}/v1/models/widget/predict", content=b"x", headers={"Content-Type": "a/b"})
    m = _metrics(url)
    predict = (("endpoint", "/v1/models/{name}/predict"), ("method", "POST"))
    assert m[("hamacho_requests_total", (*predict, ("status", "200")))] >= 1
    assert m[("hamacho_errors_total", (*predict, ("status", "415")))] >= 1
    assert m[("hamacho_request_duration_seconds_count", predict)] >= 2
    assert m[("hamacho_batch_size_count", (("model", "widget"),))] >= 1
    assert m[("hamacho_model_load_seconds", (("model", "widget"),))] > 0


def test_openapi_docs(url):
    assert "swagger" in httpx.get(f"{url}/docs").text.lower()
    spec = httpx.get(f"{url}/openapi.json").json()
    assert "multipart/form-data" in json.dumps(spec["paths"]["/v1/models/{name}/predict"])


def test_runtime_onnx_serves_the_exported_model_with_torchs_scores(run_dir, detector, tiny_mvtec):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    done = CliRunner().invoke(main, ["export", "--run", str(run_dir), "--format", "onnx"])
    assert done.exit_code == 0, done.output
    paths = _images(tiny_mvtec)
    want = np.array([detector.predict(p).score for p in paths])
    with _server("--run", f"widget={run_dir}", "--runtime", "onnx") as (_, base):
        (info,) = httpx.get(f"{base}/v1/models").json()
        assert info["runtime"] == "onnx" and info["threshold"] == detector.threshold
        rows = _predict(base, *paths).json()["results"]  # one model call for all of them
    assert [r["filename"] for r in rows] == [p.name for p in paths]
    got = np.array([r["score"] for r in rows])
    assert np.abs(got - want).max() <= 1e-4 * np.ptp(want)  # the export's parity tolerance
    assert [r["is_anomalous"] for r in rows] == [bool(s >= detector.threshold) for s in want]


# A third-party model with a bug: scoring an all-white image raises, as model code can.
_FRAGILE = """
    import torch
    from hamacho import Model, Prediction, hookimpl

    class Fragile(Model):
        name = "fragile"
        summary = "Distance from the mean good image; fails on a blank white image"

        def fit(self, train_loader):
            self.mean = torch.cat([b["image"] for b in train_loader]).mean(0)

        def predict(self, images):
            if bool((images.flatten(1).amin(1) > 2.0).any()):  # white, ImageNet-normalised
                raise ValueError("fragile cannot score a blank white image")
            maps = (images - self.mean).abs().mean(1)  # (B, H, W)
            return Prediction(scores=maps.flatten(1).amax(1), maps=maps)

        def state_dict(self):
            return {"mean": self.mean}

        def load_state_dict(self, state):
            self.mean = state["mean"]

    @hookimpl
    def hamacho_register_models():
        return [Fragile]
"""


def test_a_model_failure_is_a_500_and_harms_no_other_request(tiny_mvtec, tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    fake_dist(site, "hamacho-fragile", "fragile_model", _FRAGILE, "fragile")
    monkeypatch.syspath_prepend(str(site))  # installed: found through its entry point
    reset_registry()
    try:
        sizes = {"data.image_size": 64, "data.crop_size": None}
        fragile = hamacho.train("fragile", data=tiny_mvtec, output=tmp_path / "f", overrides=sizes)
    finally:
        reset_registry()
    good = _images(tiny_mvtec)[0]
    expected = fragile.predict(good).score
    paths = [str(site), *filter(None, [os.environ.get("PYTHONPATH")])]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(paths))  # the server sees the plugin too
    # a long batching wait, so the two concurrent requests below share one model call
    with _server("--run", str(fragile.source), "--max-wait-ms", "1000") as (_, base):
        endpoint = f"{base}/v1/models/f/predict"
        white = ("white.png", _png((64, 64), (255, 255, 255)), "image/png")
        failed = httpx.post(endpoint, files={"file": white}, timeout=60)
        assert failed.status_code == 500
        assert failed.json() == {
            "error": "scoring failed: fragile cannot score a blank white image"
        }
        answers: dict[str, httpx.Response] = {}

        def call(name: str, file: tuple) -> None:
            answers[name] = httpx.post(endpoint, files={"file": file}, timeout=60)

        files = {"white": white, "good": (good.name, good.read_bytes(), "image/png")}
        threads = [threading.Thread(target=call, args=item) for item in files.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert answers["white"].status_code == 500
        assert answers["good"].status_code == 200  # batched with the failing image, yet scored
        assert answers["good"].json()["results"][0]["score"] == pytest.approx(expected, rel=1e-5)
        m = _metrics(base)
        predict = (("endpoint", "/v1/models/{name}/predict"), ("method", "POST"))
        assert m[("hamacho_errors_total", (*predict, ("status", "500")))] == 2
        # model calls: white alone; white + good together, then each alone again
        batches = (("model", "f"),)
        assert m[("hamacho_batch_size_sum", batches)] == 1 + 2 + 1 + 1
        assert httpx.post(endpoint, files={"file": files["good"]}).status_code == 200


@pytest.mark.slow  # a second server process (its own model load)
def test_api_key_and_graceful_sigterm(run_dir, tiny_mvtec, monkeypatch):
    good = _images(tiny_mvtec)[0].read_bytes()
    monkeypatch.setenv("HAMACHO_API_KEY", KEY)
    # a long batching wait keeps a request in flight while SIGTERM arrives
    with _server("--run", f"w={run_dir}", "--max-wait-ms", "1500") as (proc, base):
        endpoint = f"{base}/v1/models/w/predict"
        assert httpx.get(f"{base}/v1/models").status_code == 401
        wrong = httpx.get(f"{base}/v1/models", headers={"X-API-Key": "nope"})
        assert wrong.status_code == 401 and "X-API-Key" in wrong.json()["error"]
        assert httpx.post(endpoint, files={"file": ("a.png", good)}).status_code == 401
        assert httpx.get(f"{base}/healthz").status_code == 200  # probes need no key
        headers = {"X-API-Key": KEY}
        assert httpx.get(f"{base}/v1/models", headers=headers).json()[0]["name"] == "w"
        answer: dict[str, httpx.Response] = {}

        def in_flight() -> None:
            files = {"file": ("a.png", good)}
            answer["r"] = httpx.post(endpoint, files=files, headers=headers, timeout=60)

        thread = threading.Thread(target=in_flight)
        thread.start()
        time.sleep(0.7)  # the request is waiting in the batcher
        proc.send_signal(signal.SIGTERM)
        thread.join(timeout=60)
        assert proc.wait(timeout=60) == 0
        assert answer["r"].status_code == 200 and answer["r"].json()["results"][0]["score"] > 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{base}/healthz")


def test_run_names_and_their_errors(tmp_path):
    assert parse_runs(("results/patchcore/bottle", "b=runs/x")) == {
        "bottle": "results/patchcore/bottle",
        "b": "runs/x",
    }
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert list(parse_runs((f"{tmp_path}/link/",))) == ["link"]  # the name given, not resolved
    with pytest.raises(UsageError, match="pass --run NAME=runs/a=b"):  # a path, not a name
        parse_runs(("runs/a=b",))
    with pytest.raises(UsageError, match="two runs are named 'x'"):
        parse_runs(("one/x", "two/x"))
    out = CliRunner().invoke(main, ["serve", "--run", str(tmp_path / "missing")])
    assert out.exit_code != 0 and out.output.startswith("error: ")
    assert len(out.output.strip().splitlines()) == 1


def test_serve_lets_openmp_threads_sleep_unless_the_user_chose(tmp_path):
    def serve_missing_run(**env: str) -> subprocess.Popen:
        environ = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        environ |= {"OMP_DISPLAY_ENV": "true", **env}  # libgomp prints its settings as it loads
        cmd = [sys.executable, "-m", "hamacho", "serve", "--run", str(tmp_path / "none")]
        return subprocess.Popen(cmd, env=environ, stderr=subprocess.PIPE, text=True)

    runs = {"PASSIVE": serve_missing_run(), "ACTIVE": serve_missing_run(OMP_WAIT_POLICY="ACTIVE")}
    try:
        for policy, proc in runs.items():
            _, err = proc.communicate(timeout=300)  # two torch imports at once, maybe loaded
            assert proc.returncode == 1 and "error: " in err  # the run is missing: torch loaded
            assert f"OMP_WAIT_POLICY = '{policy}'" in err
    finally:
        for proc in runs.values():
            proc.kill()
            proc.wait()


def test_missing_extra_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if it were not installed
    out = CliRunner().invoke(main, ["serve", "--run", "x"])
    assert out.exit_code == 2
    assert "pip install 'hamacho[serve]'" in out.output


# --- the page, driven by headless chromium over the DevTools protocol (on a pipe) -------------


class _Chromium:
    """A headless chromium spoken to over --remote-debugging-pipe (fd 3 in, fd 4 out)."""

    def __init__(self, browser: str, profile: Path) -> None:
        to_child, self._write = os.pipe()
        self._read, from_child = os.pipe()

        def wire() -> None:  # in the child: commands on fd 3, replies on fd 4
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_child, from_child)]
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        args = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]
        args += ["--disable-background-networking", "--disable-component-update"]
        args += ["--remote-debugging-pipe", f"--user-data-dir={profile}", "about:blank"]
        self.proc = subprocess.Popen(
            args, preexec_fn=wire, pass_fds=(3, 4), stderr=subprocess.DEVNULL
        )
        os.close(to_child)
        os.close(from_child)
        self._next, self._buffer, self.session = 0, b"", None

    def send(self, method: str, **params):
        self._next += 1
        message = {"id": self._next, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            message["sessionId"] = self.session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buffer:
                chunk = os.read(self._read, 1 << 20)
                assert chunk, "chromium closed the pipe"
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._next:
                assert "error" not in reply, reply["error"]
                return reply["result"]

    def evaluate(self, expression: str):
        return self.send("Runtime.evaluate", expression=expression, returnByValue=True)[
            "result"
        ].get("value")

    def wait_for(self, expression: str, timeout: float = 60):
        deadline = time.monotonic() + timeout
        while not (value := self.evaluate(expression)):
            assert time.monotonic() < deadline, f"timed out waiting for {expression}"
            time.sleep(0.2)
        return value

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        os.close(self._write)
        os.close(self._read)


def test_page_uploads_an_image_and_shows_the_verdict(url, detector, tiny_mvtec, tmp_path):
    browser = need_chromium()
    path = _images(tiny_mvtec)[-1]
    expected = detector.predict(path)
    chrome = _Chromium(browser, tmp_path / "profile")
    try:
        (target,) = [
            t for t in chrome.send("Target.getTargets")["targetInfos"] if t["type"] == "page"
        ]
        attached = chrome.send("Target.attachToTarget", targetId=target["targetId"], flatten=True)
        chrome.session = attached["sessionId"]
        chrome.send("Page.navigate", url=f"{url}/")
        chrome.wait_for("document.querySelectorAll('#model option').length")
        assert chrome.evaluate("document.getElementById('model').value") == "widget"
        root = chrome.send("DOM.getDocument")["root"]["nodeId"]
        node = chrome.send("DOM.querySelector", nodeId=root, selector="#file")["nodeId"]
        chrome.send("DOM.setFileInputFiles", files=[str(path)], nodeId=node)
        verdict = chrome.wait_for("document.getElementById('verdict').textContent")
        assert verdict == ("ANOMALOUS" if expected.is_anomalous else "GOOD")
        assert path.name in chrome.evaluate("document.getElementById('score').textContent")
        width = chrome.wait_for("document.getElementById('overlay').naturalWidth")
        assert width == 3 * Image.open(path).width  # the overlay panel was drawn
        assert chrome.evaluate("document.getElementById('error').textContent") == ""
    finally:
        chrome.close()
