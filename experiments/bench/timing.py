"""Checking each implementation against torch, then timing them round-robin in one process.

Each sample runs every implementation once for a few iterations, the starting implementation
rotating, so that a slow spell of the machine falls on all of them; a case reports the median over
samples of the time per iteration (wall clock, and the process' CPU time beside it), with the
machine's 1-minute load average before and after.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from experiments.bench import adapters, machine
from experiments.bench.cases import Case


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


def time_round_robin(impls: dict[str, adapters.Impl], samples: int, sample_s: float) -> dict:
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


def bench_case(name: str, case: Case, mode: str, impl_names: list[str], args) -> dict:
    """One (case, mode): every implementation that applies is checked against torch (the first
    of `impl_names`), and those that agree are timed side by side."""
    load_start = machine.load_average()
    module, x, cot = adapters.setup(case, args.torch_device)
    tol = adapters.tolerance()

    impls, record = {}, {"case": name, "mode": mode, "shape": case._asdict(), "impls": {}}
    reference = None
    for impl_name in impl_names:
        if not adapters.applies(impl_name, case):
            continue
        impl = adapters.make_impl(impl_name, case, mode, module, x, cot, args.torch_device)
        got = impl.result(impl.sync(impl.run()))
        if reference is None:
            reference = got
        err = max_rel_err(got, reference)
        rec = record["impls"][impl_name] = {"max_rel_err": err, "compile_s": impl.compile_s}
        print(f"  {impl_name}: max relative error vs torch {err:.1e}", flush=True)
        if err > tol:
            rec["error"] = f"disagrees with torch: max relative error {err:.2e} > {tol:.0e}"
            print(f"  {name}/{mode}/{impl_name}: {rec['error']} -- not timed", flush=True)
            continue
        impls[impl_name] = impl
    for impl_name, timing in time_round_robin(impls, args.samples, args.sample_s).items():
        record["impls"][impl_name] |= timing
    # Other processes on the cores skew the ratios (torch's OpenMP team loses more than XLA).
    return record | machine.load_record(load_start, machine.load_average())
