"""Timing and peak-memory helpers shared by the report and the pytest-benchmark files.

GPU: ``triton.testing.do_bench`` (median after warm-up, quantiles [0.5, 0.2, 0.8]) for
calls under ~0.1 s; longer calls (the full COCO grid takes seconds) are timed with CUDA
events, one warm-up and a few repeats, because do_bench would run them ~8 times.
CPU: medians of wall-clock repeats (``time.perf_counter``), after one warm-up call.
"""
from __future__ import annotations

import os
import threading
import time
from typing import Callable, Optional

import numpy as np
import torch


def _summary(times_s) -> dict:
    t = np.asarray(times_s, dtype=np.float64)
    return {
        "median_s": float(np.median(t)),
        "q20_s": float(np.quantile(t, 0.2)),
        "q80_s": float(np.quantile(t, 0.8)),
        "repeats": int(t.size),
        "method": "wall-clock median",
    }


def time_cpu(fn: Callable[[], object], *, repeats: int = 5, warmup: int = 1, budget_s: float = 10.0, min_repeats: int = 1,
             first_context=None, single_ok: bool = True) -> dict:
    """Median of wall-clock repeats of ``fn()`` after ``warmup`` calls.

    Stops early once ``budget_s`` of timed calls has passed (but after at least
    ``min_repeats``), so a slow case at a big size costs a bounded time. A warm-up
    call that alone takes longer than ``budget_s`` is kept as the (only) sample: at a
    big size the code path is already warm from the smaller sizes, and a second call
    of minutes would double the cost of the report for no information.

    Returns {"median_s", "q20_s", "q80_s", "repeats", "method", "first_s"}; ``first_s``
    is the first (warm-up) call, which holds compile time for torch.compile.
    ``single_ok=False`` (compiled code, whose first call holds the compile) always
    times at least one call after the warm-up. ``first_context``: a context manager entered around the first call only (the
    memory sampler: a sampling thread competes for the GIL and, on a busy machine,
    slowed op-heavy calls several-fold, so it never runs during the timed calls).
    """
    first = None
    for i in range(warmup):
        t0 = time.perf_counter()
        if i == 0 and first_context is not None:
            with first_context:
                fn()
        else:
            fn()
        if i == 0:
            first = time.perf_counter() - t0
            if single_ok and first > budget_s and min_repeats <= 1:
                out = _summary([first])
                out.update(first_s=first, method="wall-clock, single call (longer than the repeat budget)")
                return out
    times = []
    spent = 0.0
    while len(times) < repeats:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        times.append(dt)
        spent += dt
        if spent >= budget_s and len(times) >= min_repeats:
            break
    out = _summary(times)
    out["first_s"] = first
    return out


def time_cuda(fn: Callable[[], object], *, repeats: int = 5, warmup: int = 1, long_call_s: float = 0.1) -> dict:
    """GPU timing: do_bench for short calls, CUDA events for long ones (see module doc)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()  # warm-up, compiles kernels
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    if first < long_call_s:
        import triton.testing

        q50, q20, q80 = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
        return {"median_s": q50 / 1e3, "q20_s": q20 / 1e3, "q80_s": q80 / 1e3, "repeats": None,
                "method": "triton.testing.do_bench median", "first_s": first}
    for _ in range(warmup - 1):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    out = _summary(times)
    out["method"] = "CUDA events median"
    out["first_s"] = first
    return out


def time_once(fn: Callable[[], object], device) -> float:
    """Seconds of exactly one call (a full grid that takes seconds is run once): CUDA
    events around it on a GPU (after a synchronise), wall clock on the CPU."""
    if torch.device(device).type != "cuda":
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def time_fn(fn: Callable[[], object], device: torch.device, **kw) -> dict:
    """Dispatch to :func:`time_cuda` or :func:`time_cpu` by device type."""
    if torch.device(device).type == "cuda":
        kw.pop("budget_s", None)
        kw.pop("min_repeats", None)
        kw.pop("first_context", None)
        kw.pop("single_ok", None)
        return time_cuda(fn, **kw)
    return time_cpu(fn, **kw)


def _rss_bytes() -> Optional[int]:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc), so RSS growth reflects this call, not leftovers."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class RssPeak:
    """Peak resident-set growth of this process while the block runs (CPU, Linux).

    Samples /proc/self/statm every ``interval_s`` in a thread: an approximation (a
    spike shorter than the interval is missed), stated as such in the results.
    """

    def __init__(self, interval_s: float = 0.01):
        self.interval_s = interval_s
        self.peak = None

    def _run(self):
        while not self._stop.is_set():
            r = _rss_bytes()
            if r is not None and r > self.peak:
                self.peak = r
            self._stop.wait(self.interval_s)

    def __enter__(self):
        _trim_heap()
        self.base = _rss_bytes()
        self.peak = self.base if self.base is not None else 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        r = _rss_bytes()
        if r is not None and r > self.peak:
            self.peak = r
        return False

    @property
    def growth_bytes(self) -> Optional[int]:
        base = getattr(self, "base", None)
        return None if base is None else int(self.peak - base)


def peak_memory(fn: Callable[[], object], device: torch.device) -> dict:
    """Extra memory one call of ``fn()`` needs at its peak, beyond what was held before.

    Returns {"peak_bytes", "memory_method"}: CUDA ``max_memory_allocated`` on a GPU,
    sampled RSS growth on a CPU (call ``fn`` once before, so caches are warm).
    """
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return {"peak_bytes": int(torch.cuda.max_memory_allocated() - before), "memory_method": "torch.cuda.max_memory_allocated"}
    with RssPeak() as meter:
        fn()
    return {"peak_bytes": meter.growth_bytes, "memory_method": "sampled RSS growth (approx.)"}
