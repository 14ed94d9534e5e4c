"""Micro-batching: concurrent requests for one model are scored together in one call."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import cast

import numpy as np

from hamacho.api import Detector, Result

_STOP = object()


class MicroBatcher:
    """One worker thread per model: waits at most ``max_wait_s`` after the first image for more,
    up to ``max_batch`` images, then scores them in one ``Detector.predict`` call.

    Only this thread calls the detector, so a model is never run from two threads at once.
    """

    def __init__(
        self,
        detector: Detector,
        max_batch: int = 16,
        max_wait_s: float = 0.005,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self.detector, self.max_batch, self.max_wait_s = detector, max(1, max_batch), max_wait_s
        self.on_batch = on_batch
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="hamacho-batcher", daemon=True)
        self._thread.start()

    def submit(self, image: np.ndarray) -> Future[Result]:
        """Queue one decoded (H, W, 3) uint8 image; the future resolves to its Result."""
        future: Future[Result] = Future()
        self._queue.put((image, future))
        return future

    def close(self) -> None:
        """Score what is queued, then stop the worker."""
        self._queue.put(_STOP)
        self._thread.join()

    def _loop(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                return
            batch = [first]
            deadline = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    break
                batch.append(item)
            self._score(batch)

    def _score(self, batch: list[tuple[np.ndarray, Future[Result]]]) -> None:
        if self.on_batch is not None:
            self.on_batch(len(batch))
        try:
            images = [image for image, _ in batch]
            results = cast(list[Result], self.detector.predict(images, batch_size=len(batch)))
        except Exception as exc:  # reaches the waiting request as a 500, never kills the loop
            if len(batch) == 1:
                batch[0][1].set_exception(exc)
                return
            for item in batch:  # one image alone, so only the one that fails gets the error
                self._score([item])
            return
        for (_, future), result in zip(batch, results, strict=True):
            future.set_result(result)
