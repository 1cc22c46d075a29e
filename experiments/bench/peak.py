"""The machine's float32 GEMM peak, and each case's figures against it.

A recurrent layer's time is mostly GEMMs, so the fair yardstick for a case is how close it runs to
the best float32 GEMM this machine does. :func:`measure` times, in a child process (so that no
library's spinning worker threads are left behind to slow the cases), ``torch.mm`` (oneDNN/MKL),
XLA's dot (``jax.jit(jnp.dot)``) and numpy's ``@`` (the BLAS numpy ships, OpenBLAS on pip wheels),
one library after the other with a pause between them, since each one's idle threads spin for a
while after its last call and take cores from the next: on a square 2048 x 2048 x 2048 product,
whose best figure is the *peak*, and on each case's per-step gate GEMM ``(batch, input + hidden)
@ (input + hidden, gates * hidden)`` of its first layer, whose best is what a loop of that case's
steps could reach.

:func:`best_of` merges two measurements, one before the cases and one after: a shared machine can
run slow for a minute, and a peak measured then would judge every case against too low a figure
(on a 2-core Zen 3 EPYC, 2026-12-03, one run's peak came out at 142 GFLOP/s against 189-190 in the
runs before and after it, the cases' own times unchanged).

:func:`target` is the rule the CPU figures are held to: where torch runs below 80 % of the peak,
jlstm must take at most 0.85 of torch's time; where torch is GEMM-bound (80 % or more), at most
torch's time and at least 90 % of the best GEMM on the case's step shape.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np

from experiments.bench.cases import CASES, Case, flops
from experiments.bench.timing import Timed, time_round_robin

SQUARE = 2048
GEMM_BOUND = 0.80  # torch at or above this share of the peak: the case is GEMM-bound
LEAD = 0.85  # jlstm/torch wanted where torch is not GEMM-bound
NEAR_STEP_BEST = 0.90  # share of the step shape's best GEMM wanted where torch is GEMM-bound
PAUSE_S = 0.5  # between libraries: longer than OpenBLAS' and OpenMP's spin before they sleep


def step_shape(case: Case) -> tuple[int, int, int]:
    """``(m, k, n)`` of the first layer's per-step gate GEMM.

    >>> step_shape(Case("lstm", 128, 64, 512, 1024, 1, False))
    (128, 1536, 4096)
    """
    gates = 4 if case.cell == "lstm" else 3
    return case.batch, case.input_size + case.hidden_size, gates * case.hidden_size


def _gemms(m: int, k: int, n: int) -> dict[str, Timed]:
    import jax
    import jax.numpy as jnp
    import torch

    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k), np.float32)
    b = rng.standard_normal((k, n), np.float32)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    dot = jax.jit(jnp.dot)
    return {
        "torch.mm": Timed(lambda: torch.mm(ta, tb), lambda r: r),
        "xla dot": Timed(lambda: dot(ja, jb), lambda r: r.block_until_ready()),
        "numpy @": Timed(lambda: a @ b, lambda r: r),
    }


def gflops(m: int, k: int, n: int, samples: int, sample_s: float) -> dict[str, float]:
    """GFLOP/s of each library on ``(m, k) @ (k, n)``: the median over ``samples`` samples of
    about ``sample_s`` seconds each, one library at a time."""
    rates = {}
    for name, gemm in _gemms(m, k, n).items():
        time.sleep(PAUSE_S)
        median_s = time_round_robin({name: gemm}, samples, sample_s)[name]["median_s"]
        rates[name] = 2 * m * k * n / median_s / 1e9
    return rates


def measure_here(case_names: list[str], samples: int, sample_s: float) -> dict:
    """The square peak and each case's step-shape best, measured in this process."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    square = gflops(SQUARE, SQUARE, SQUARE, samples, sample_s)
    steps = {}
    for name in case_names:
        shape = step_shape(CASES[name])
        by_lib = gflops(*shape, samples, sample_s)
        steps[name] = {"shape": shape, "gflops": by_lib, "best_gflops": max(by_lib.values())}
    return {"square": square, "peak_gflops": max(square.values()), "steps": steps}


def measure(case_names: list[str], samples: int, sample_s: float) -> dict:
    """:func:`measure_here` in a child process: ``{"square": {library: GFLOP/s}, "peak_gflops",
    "steps": {case: {"shape", "gflops", "best_gflops"}}}``."""
    cmd = [sys.executable, "-m", "experiments.bench.peak", ",".join(case_names)]
    cmd += [str(samples), str(sample_s)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"measuring the GEMM peak failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def best_of(first: dict, second: dict) -> dict:
    """Two :func:`measure` results (each with its load, ``machine.load_since``) as one: every
    library's and step shape's better figure, the peak among them, both measurements under
    ``"measured"``, and the load of either (``loaded`` if either was).

    >>> a = {"square": {"mm": 100.0}, "steps": {"c": {"shape": [1, 2, 3], "gflops": {"mm": 9.0}}}}
    >>> b = {"square": {"mm": 150.0}, "steps": {"c": {"shape": [1, 2, 3], "gflops": {"mm": 8.0}}}}
    >>> for m, end in ((a, 0.5), (b, 0.7)):
    ...     m |= {"load_avg_1m": 0.1, "load_avg_1m_end": end, "others_cores": end, "loaded": False}
    >>> merged = best_of(a, b)
    >>> merged["peak_gflops"], merged["steps"]["c"]["best_gflops"], merged["others_cores"]
    (150.0, 9.0, 0.7)
    """
    both = (first, second)
    square = {lib: max(m["square"][lib] for m in both) for lib in first["square"]}
    steps = {}
    for name, step in first["steps"].items():
        rates = {lib: max(m["steps"][name]["gflops"][lib] for m in both) for lib in step["gflops"]}
        steps[name] = {"shape": step["shape"], "gflops": rates, "best_gflops": max(rates.values())}
    return {
        "square": square,
        "peak_gflops": max(square.values()),
        "steps": steps,
        "measured": [dict(m) for m in both],
        "load_avg_1m": first["load_avg_1m"],
        "load_avg_1m_end": second["load_avg_1m_end"],
        "others_cores": max(m["others_cores"] for m in both),
        "loaded": first["loaded"] or second["loaded"],
    }


def target(torch_share: float, jlstm_torch: float, jlstm_of_step_best: float) -> str:
    """The target a case is held to and whether it is met, for a table cell.

    >>> target(0.60, 0.80, 0.5), target(0.60, 0.90, 0.5)
    ('≤ 0.85: met', '≤ 0.85: missed')
    >>> target(0.85, 0.97, 0.93), target(0.85, 0.97, 0.80)
    ('≤ 1, ≥ 90 % of step GEMM: met', '≤ 1, ≥ 90 % of step GEMM: missed')
    """
    if torch_share < GEMM_BOUND:
        return f"≤ {LEAD}: " + ("met" if jlstm_torch <= LEAD else "missed")
    met = jlstm_torch <= 1.0 and jlstm_of_step_best >= NEAR_STEP_BEST
    return f"≤ 1, ≥ {NEAR_STEP_BEST * 100:.0f} % of step GEMM: " + ("met" if met else "missed")


def line(result: dict) -> str:
    """One line on the peak for the report."""
    square = ", ".join(f"{k} {v:.0f}" for k, v in result["square"].items())
    steps = "; ".join(
        f"{name} {'x'.join(map(str, s['shape']))} {s['best_gflops']:.0f}"
        for name, s in result["steps"].items()
    )
    return (
        f"float32 GEMM, GFLOP/s (median of samples): {SQUARE}^3 {square} -> peak "
        f"{result['peak_gflops']:.0f}; best on each case's step shape: {steps}"
    )


def judge(record: dict, case: Case, mode: str, result: dict) -> dict:
    """What a timed case adds against the peak: each implementation's GFLOP/s, torch's and
    jlstm's share of the peak, jlstm's share of the step shape's best, and the target cell."""
    rates = {
        name: flops(case, mode) / timing["median_s"] / 1e9
        for name, timing in record["impls"].items()
        if "median_s" in timing
    }
    out = {"gflops": rates}
    if "torch" in rates and "jlstm" in rates:
        peak, step_best = result["peak_gflops"], result["steps"][record["case"]]["best_gflops"]
        out |= {
            "torch_of_peak": rates["torch"] / peak,
            "jlstm_of_peak": rates["jlstm"] / peak,
            "jlstm_of_step_best": rates["jlstm"] / step_best,
        }
        out["target"] = target(
            out["torch_of_peak"], rates["torch"] / rates["jlstm"], out["jlstm_of_step_best"]
        )
    return out


if __name__ == "__main__":  # the child of measure()
    names, samples, sample_s = sys.argv[1].split(","), int(sys.argv[2]), float(sys.argv[3])
    print(json.dumps(measure_here(names, samples, sample_s)))
