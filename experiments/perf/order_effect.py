"""Backs the order of ``make bench``'s round-robin: whether an implementation's time depends on
which implementation ran just before it.

    python -m experiments.perf.order_effect mnist,small train 3
    python -m experiments.perf.order_effect medium fwd 4 schedules

For every case and each of ``rounds`` rounds, every implementation X (torch, jlstm, jlstm-fused,
flax; checked against torch as ``make bench`` does) runs ``CHUNKS`` chunks of about ``CHUNK_S``
seconds each, synced at the end of each chunk, right after each implementation Y ran for as long
(Y = X: X's steady state), and after a pause of ``PAUSE_S`` seconds and one untimed call of X
("settled"). Printed: the median over rounds of X's time per iteration in each chunk relative to
X's steady time, and the jlstm/torch and jlstm/flax ratios each way. If X's figures after one Y
differ from those after another by more than the rounds' range, what ran before changes what the
bench measures, and an order that always times X after the same Y biases its ratios.

With ``schedules``, each round instead runs ``make bench``'s round-robin (9 samples of 0.2 s) twice,
once in the rotation runs before 2026-12-04 used (the starting implementation moving on by one
each sample, so jlstm always right after torch) and once in today's Williams rows
(``experiments.bench.timing.orders``), and prints each schedule's jlstm/torch and jlstm/flax ratios
per round and their medians.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from experiments.bench import adapters, timing
from experiments.bench.cases import CASES
from experiments.bench.timing import _iterations, _sample

IMPLS = ("torch", "jlstm", "jlstm-fused", "flax")
CHUNK_S = 0.1
CHUNKS = 4
PAUSE_S = 0.5


def measure(impls: dict, rounds: int) -> dict:
    """``{(before, x): [[seconds per iteration in each chunk], one list per round]}``: ``before``
    (an implementation, or "settled") runs, then X runs ``CHUNKS`` chunks of ``CHUNK_S``."""
    iters = {n: _iterations(impl, CHUNK_S) for n, impl in impls.items()}
    times = {}
    pairs = [(y, x) for y in ("settled", *impls) for x in impls]
    for r in range(rounds):
        # Each round starts elsewhere in the pairs, so that a slow spell falls on all of them.
        first = r * len(pairs) // rounds
        for y, x in pairs[first:] + pairs[:first]:
            if y == "settled":
                time.sleep(PAUSE_S)
                impls[x].sync(impls[x].run())
            else:
                for _ in range(CHUNKS):
                    _sample(impls[y], iters[y])
            chunks = [_sample(impls[x], iters[x])[0] for _ in range(CHUNKS)]
            times.setdefault((y, x), []).append(chunks)
    return times


def report(name: str, mode: str, times: dict, impls: dict, rounds: int) -> None:
    medians = {k: [statistics.median(c) for c in zip(*v, strict=True)] for k, v in times.items()}
    steady = {x: statistics.median(medians[x, x][1:]) for x in impls}
    print(
        f"\n{name} {mode}: X's time per iteration in {CHUNKS} chunks of {CHUNK_S} s right after Y, "
        f"over X's steady time (X after X, chunks 2-{CHUNKS}); medians of {rounds} "
        "rounds, and the rounds' range of X's first chunk after X"
    )
    for x in impls:
        own = [r[0] / steady[x] for r in times[x, x]]
        print(f"  X = {x}: steady {steady[x] * 1e3:.3f} ms, range {min(own):.2f}-{max(own):.2f}")
        for y in ("settled", *impls):
            cells = " ".join(f"{c / steady[x]:6.3f}" for c in medians[y, x])
            print(f"    after {y:12} {cells}")
    for other in ("torch", "flax"):
        for chunk in (0, CHUNKS - 1):
            cells = "  ".join(
                f"{y} {medians[y, 'jlstm'][chunk] / medians[y, other][chunk]:.3f}"
                for y in ("settled", *impls)
            )
            print(f"  jlstm/{other}, chunk {chunk + 1}, each after: {cells}")


def rotation(n: int, samples: int) -> list[list[int]]:
    """The order of the rotation: ``[[0, 1, 2], [1, 2, 0], [2, 0, 1], ...]``."""
    return [[(s + j) % n for j in range(n)] for s in range(samples)]


def schedules(name: str, mode: str, impls: dict, rounds: int) -> None:
    orders_of = {"rotation": rotation, "williams": timing.orders}
    ratios = {kind: [] for kind in orders_of}
    for r in range(rounds):
        for kind in list(orders_of)[:: 1 if r % 2 == 0 else -1]:
            t = timing.time_round_robin(impls, 9, 0.2, schedule=orders_of[kind])
            jlstm = t["jlstm"]["median_s"]
            ratios[kind].append((jlstm / t["torch"]["median_s"], jlstm / t["flax"]["median_s"]))
    print(f"\n{name} {mode}: jlstm/torch, jlstm/flax of make bench's round-robin, per round")
    for kind, runs in ratios.items():
        cells = "  ".join(f"{a:.3f} {b:.3f}" for a, b in runs)
        medians = [statistics.median(column) for column in zip(*runs, strict=True)]
        print(f"  {kind:9} {cells}   median {medians[0]:.3f} {medians[1]:.3f}")


def main(names: str, modes: str, rounds: int, what: str = "pairs") -> None:
    torch.set_num_threads(2)
    for name in names.split(","):
        for mode in modes.split(","):
            impls = adapters.checked_impls(CASES[name], mode, IMPLS)
            if what == "schedules":
                schedules(name, mode, impls, rounds)
            else:
                report(name, mode, measure(impls, rounds), impls, rounds)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), *sys.argv[4:5])
