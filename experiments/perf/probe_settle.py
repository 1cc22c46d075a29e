"""Backs the pause before ``make bench``'s speed probe: how fast the probe (a 1024^3 float32 XLA
GEMM, ``experiments.bench.machine.gemm_probe``) runs right after each implementation of a case,
with and without a pause first.

    python -m experiments.perf.probe_settle wide train 0.2 4

For each of ``rounds`` rounds, every implementation (torch, jlstm, jlstm-fused, flax; checked
against torch as ``make bench`` does) runs one call, then, after ``pause`` seconds (0 and the given
one, alternating), the probe runs ``ITERATIONS`` times; printed is the median over rounds of each
iteration's GFLOP/s. If the figures after one implementation stay below those after another for
several iterations without a pause and agree after it, what ran before slows the probe, not the
machine.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from experiments.bench import adapters, machine
from experiments.bench.cases import CASES

IMPLS = ("torch", "jlstm", "jlstm-fused", "flax")
ITERATIONS = 5


def probe_rates(probe, pause: float) -> list[float]:
    time.sleep(pause)
    rates = []
    for _ in range(ITERATIONS):
        start = time.perf_counter()
        probe.sync(probe.run())
        rates.append(2 * machine.PROBE_SIZE**3 / (time.perf_counter() - start) / 1e9)
    return rates


def main(name: str, mode: str, pause: float, rounds: int) -> None:
    torch.set_num_threads(2)
    impls = adapters.checked_impls(CASES[name], mode, IMPLS)
    probe = machine.gemm_probe()
    probe.sync(probe.run())
    rates = {(p, n): [] for p in (0.0, pause) for n in impls}
    for _ in range(rounds):
        for p in (0.0, pause):
            for n, impl in impls.items():
                impl.sync(impl.run())
                rates[p, n].append(probe_rates(probe, p))
    print(f"{name} {mode}: the probe's GFLOP/s, iterations 1-{ITERATIONS}, median of {rounds}")
    for (p, n), runs in rates.items():
        medians = [round(statistics.median(column)) for column in zip(*runs, strict=True)]
        print(f"  after {n:12} pause {p:.2f} s: {medians}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]))
