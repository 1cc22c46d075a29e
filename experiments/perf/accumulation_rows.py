"""Backs the C++ loop's ``accumulation_group`` (``jlstm/csrc/recurrence.cc``) and BENCHMARKS.md's
figures on it: ``python -m experiments.perf.accumulation_rows medium,long,gru 1,64 3``.

When the backward loop forms the weight gradients itself, each pass over a thread's rows of them
adds the gate gradients of a group of steps: at least ``JLSTM_ACCUMULATION_ROWS`` rows (default
64; 1 adds one step at a time, as before groups), at most 16 steps. For each benchmark case (train
mode, its weights-in-loop backward) and each setting of that variable, a process of its own checks
the gradients against ``impl="scan"`` and prints the median wall time of 21 train steps; the
settings alternate for ``rounds`` rounds (default 3). Prints every round's figure and each
setting's time over the first setting's, round by round.
"""

import sys

from experiments.bench.cases import CASES
from experiments.perf.common import alternate, checked_train_ms


def main(cases: list[str], rows: list[str], rounds: int) -> None:
    for name in cases:
        settings = {r: ([name], {"JLSTM_ACCUMULATION_ROWS": r}) for r in rows}
        ms = alternate("experiments.perf.accumulation_rows", settings, rounds)
        first = ms[rows[0]]
        for r in rows:
            ratios = " ".join(f"{t / f:.2f}" for t, f in zip(ms[r], first, strict=True))
            times = " ".join(f"{t:.2f}" for t in ms[r])
            print(f"{name} train, rows {r}: {times} ms; / rows {rows[0]}: {ratios}", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "--child":
        print(f"{checked_train_ms(CASES[sys.argv[2]]):.3f}")
    else:
        main(
            sys.argv[1].split(","),
            sys.argv[2].split(",") if len(sys.argv) > 2 else ["1", "64"],
            int(sys.argv[3]) if len(sys.argv) > 3 else 3,
        )
