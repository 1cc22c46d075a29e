"""Backs ``jlstm.native.WEIGHTS_IN_LOOP_BYTES`` for small batches and BENCHMARKS.md's batch-1
backward figures: ``python -m experiments.perf.backward_batch 1,2,3 64,256``. For each batch size
and hidden size (an LSTM, T=128, I=64, one layer), the C++ loop's train step compiled both ways its
backward can end:

- ``in loop``: the backward loop sums the weight gradients itself as it goes (a small batch's steps
  in groups),
- ``gates out``: it hands every step's gate gradients to XLA's whole-sequence GEMMs.

Each setting runs in a process of its own, the two alternating for ``rounds`` rounds (default 3):
in one process the two programs' buffers come and go between each other's calls, which changes
what the memory allocator hands back to the system and so the very cost being compared. A process
sets ``jlstm.native``'s public limit (``WEIGHTS_IN_LOOP_BYTES``: the default, or 0 for gates out),
checks the gradients against ``impl="scan"``, and prints the median wall time of 21 steps.
"""

import sys

from experiments.bench.cases import Case
from experiments.perf.common import alternate, checked_train_ms

SETTINGS = ("in loop", "gates out")


def child(batch: int, hidden: int, setting: str) -> None:
    from jlstm import native

    if setting == "gates out":
        native.WEIGHTS_IN_LOOP_BYTES = 0
    print(f"{checked_train_ms(Case('lstm', batch, 128, 64, hidden, 1, False)):.3f}")


def main(batches: list[int], hiddens: list[int], rounds: int) -> None:
    for hidden in hiddens:
        for batch in batches:
            args = [str(batch), str(hidden)]
            ms = alternate(
                "experiments.perf.backward_batch", {s: ([*args, s], {}) for s in SETTINGS}, rounds
            )
            ratios = [out / loop for loop, out in zip(*ms.values(), strict=True)]
            print(
                f"batch {batch} hidden {hidden}: in loop "
                + " ".join(f"{t:.2f}" for t in ms["in loop"])
                + " ms, gates out "
                + " ".join(f"{t:.2f}" for t in ms["gates out"])
                + " ms; gates out / in loop "
                + " ".join(f"{r:.2f}" for r in ratios),
                flush=True,
            )


if __name__ == "__main__":
    if sys.argv[1] == "--child":
        child(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    else:
        rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
        main(
            [int(b) for b in sys.argv[1].split(",")],
            [int(h) for h in sys.argv[2].split(",")],
            rounds,
        )
