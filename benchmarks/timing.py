"""Timing harness: warm-up, then the median, min and max of repeated runs, and peak memory."""

from __future__ import annotations

import statistics
import threading
import time

import jax
import psutil


class PeakRSS:
    """Context manager sampling this process's resident memory; ``.peak`` bytes above the start."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak = 0

    def __enter__(self):
        self._proc = psutil.Process()
        self._start = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss - self._start)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss - self._start)


def measure(fn, repeats: int = 5, warmup: int = 1) -> dict:
    """Time ``fn()`` (its jax outputs made ready): ``warmup`` untimed calls, then ``repeats``.

    Returns {"median", "min", "max", "runs" (seconds), "repeats", "peak_rss_bytes",
    "first_call"}: ``first_call`` is the first warm-up call's wall time, compilation included
    (``first_call - median`` estimates the compile time of a jitted ``fn``).
    """
    first = None
    for _ in range(warmup):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        first = time.perf_counter() - t0 if first is None else first
    runs = []
    with PeakRSS() as mem:
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            runs.append(time.perf_counter() - t0)
    return {"median": statistics.median(runs), "min": min(runs), "max": max(runs), "runs": runs,
            "repeats": repeats, "peak_rss_bytes": mem.peak, "first_call": first}
