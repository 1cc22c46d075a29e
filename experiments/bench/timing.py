"""Comparing results, and timing implementations round-robin in one process.

Each sample runs every implementation once for a few iterations, the starting implementation
rotating, so that a slow spell of the machine falls on all of them; a case reports the median over
samples of the time per iteration (wall clock, and the process' CPU time beside it). Nothing here
imports torch or JAX, so the perf scripts that profile jlstm alone use it too.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np


class Timed(NamedTuple):
    """What :func:`time_round_robin` needs of an implementation (``adapters.Impl`` has more)."""

    run: Callable[[], Any]  # one iteration, synchronous only after `sync`
    sync: Callable[[Any], Any]  # waits for the result of `run`


def max_rel_err(got: dict, want: dict) -> float:
    """Largest |got - want| per array, relative to that array's largest |want| (float32 scale).

    >>> max_rel_err({"y": np.array([1.0, 2.5])}, {"y": np.array([1.0, 2.0])})
    0.25
    """
    if set(got) != set(want):
        raise ValueError(f"compared arrays differ: {sorted(got)} vs {sorted(want)}")
    errs = []
    for k, w in want.items():
        g = np.asarray(got[k], np.float64)
        if g.shape != w.shape:
            raise ValueError(f"{k}: shape {g.shape} != torch's {w.shape}")
        errs.append(np.max(np.abs(g - w)) / max(np.max(np.abs(w)), 1e-30))
    return float(max(errs))


def time_round_robin(impls: dict[str, Timed], samples: int, sample_s: float) -> dict:
    """Median time per iteration of each implementation over `samples` round-robin samples:
    wall clock (``median_s``, what the tables show) and process CPU time (``cpu_median_s``: about
    wall x the number of cores kept busy)."""
    iters = {}
    for name, impl in impls.items():  # warm up, then size a sample to about sample_s
        impl.sync(impl.run())
        start = time.perf_counter()
        impl.sync(impl.run())
        iters[name] = max(1, min(1000, round(sample_s / (time.perf_counter() - start))))
    times, cpu = {name: [] for name in impls}, {name: [] for name in impls}
    order = list(impls)
    for s in range(samples):
        for name in order[s % len(order) :] + order[: s % len(order)]:
            impl, n = impls[name], iters[name]
            start, cpu_start = time.perf_counter(), time.process_time()
            for _ in range(n):
                r = impl.run()
            impl.sync(r)
            times[name].append((time.perf_counter() - start) / n)
            cpu[name].append((time.process_time() - cpu_start) / n)
    return {
        name: {
            "median_s": statistics.median(t),
            "samples_s": t,
            "iters": iters[name],
            "cpu_median_s": statistics.median(cpu[name]),
        }
        for name, t in times.items()
    }
