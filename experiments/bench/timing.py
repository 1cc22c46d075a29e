"""Comparing results, and timing implementations round-robin in one process.

Each sample runs every implementation once for a few iterations, so that a slow spell of the
machine falls on all of them, in an order that changes from sample to sample (:func:`orders`); a
case reports the median over samples of the time per iteration (wall clock, and the process' CPU
time beside it). Nothing here imports torch or JAX.
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


class Beside(NamedTuple):
    """``impl`` timed right after each call of ``neighbour``, which is not timed: what ``impl``
    loses to a library whose threads go on spinning after their own call returns (torch's OpenMP
    team, with its default wait policy, keeps cores busy for milliseconds), as when a program keeps
    torch beside jlstm in one process."""

    impl: Timed
    neighbour: Timed


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


def orders(n: int, samples: int) -> list[list[int]]:
    """The order of ``n`` implementations in each of ``samples`` samples: rows of a Williams
    design, so that every implementation comes first equally often and, over every ``n`` samples
    (``2 n`` for odd ``n``), right after each other implementation equally often. Whatever ran just
    before a call can slow it or speed it up for a while; a fixed cyclic order (B always after A)
    would hand each implementation the same neighbour in every sample, and a bias to its ratios
    (on a 2-core Zen 3, medium and mnist fwd gave the same jlstm/torch either way within the
    rounds' range: this removes the possibility by construction).

    >>> orders(4, 5)
    [[0, 1, 3, 2], [1, 2, 0, 3], [2, 3, 1, 0], [3, 0, 2, 1], [0, 1, 3, 2]]
    >>> orders(3, 6)
    [[0, 1, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0], [0, 2, 1], [1, 0, 2]]
    """
    first = [0]
    for k in range(1, n):
        first.append((k + 1) // 2 if k % 2 else n - k // 2)
    rows = [[(j + i) % n for j in first] for i in range(n)]
    if n % 2:
        rows += [row[::-1] for row in rows]
    return [rows[s % len(rows)] for s in range(samples)] if n else [[] for _ in range(samples)]


def _iterations(impl: Timed | Beside, sample_s: float) -> int:
    """How many iterations of ``impl`` fill about ``sample_s`` seconds (after one to warm up)."""
    calls = (impl.neighbour, impl.impl) if isinstance(impl, Beside) else (impl,)
    for each in calls:
        each.sync(each.run())
    start = time.perf_counter()
    for each in calls:
        each.sync(each.run())
    return max(1, min(1000, round(sample_s / (time.perf_counter() - start))))


def _sample(impl: Timed | Beside, n: int) -> tuple[float, float]:
    """Wall and process CPU seconds per iteration over ``n`` iterations, synced at the end (each
    iteration on its own, right after its neighbour's call, for a :class:`Beside`)."""
    if isinstance(impl, Beside):
        wall = cpu = 0.0
        for _ in range(n):
            impl.neighbour.sync(impl.neighbour.run())
            start, cpu_start = time.perf_counter(), time.process_time()
            impl.impl.sync(impl.impl.run())
            wall += time.perf_counter() - start
            cpu += time.process_time() - cpu_start
        return wall / n, cpu / n
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(n):
        r = impl.run()
    impl.sync(r)
    return (time.perf_counter() - start) / n, (time.process_time() - cpu_start) / n


def time_round_robin(
    impls: dict[str, Timed | Beside],
    samples: int,
    sample_s: float,
    probe: Timed | None = None,
    probe_s: float = 0.05,
    settle_s: float = 0.2,
) -> dict:
    """Median time per iteration of each implementation over `samples` round-robin samples:
    wall clock (``median_s``, what the tables show) and process CPU time (``cpu_median_s``: about
    wall x the number of cores kept busy).

    A ``probe`` is timed too, for about ``probe_s`` at the start of every sample, under
    ``"probe"``: a fixed workload whose time tells how fast the machine ran meanwhile. A pause of
    ``settle_s`` and one untimed call come first, so that what ran before it has settled: on a
    2-core Zen 3, right after a flax or lax.scan train step of the wide case, a 1024^3 GEMM ran
    30-45 % slower for several iterations than after torch's, and a 0.2 s pause brought it back to
    its speed after torch's; a first iteration is slower after any.
    """
    iters = {name: _iterations(impl, sample_s) for name, impl in impls.items()}
    times, cpu = {name: [] for name in impls}, {name: [] for name in impls}
    probe_times = []
    probe_iters = probe and _iterations(probe, probe_s)
    names = list(impls)
    for order in orders(len(names), samples):
        if probe:
            time.sleep(settle_s)
            probe.sync(probe.run())
            probe_times.append(_sample(probe, probe_iters)[0])
        for name in (names[i] for i in order):
            wall, cpu_s = _sample(impls[name], iters[name])
            times[name].append(wall)
            cpu[name].append(cpu_s)
    timings = {
        name: {
            "median_s": statistics.median(t),
            "samples_s": t,
            "iters": iters[name],
            "cpu_median_s": statistics.median(cpu[name]),
        }
        for name, t in times.items()
    }
    if probe:
        timings["probe"] = {"median_s": statistics.median(probe_times), "samples_s": probe_times}
    return timings
