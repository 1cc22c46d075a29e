"""Backs ``jlstm.native.OVERWRITE_SAVED_GATES``: ``python -m experiments.perf.saved_gates wide``.
For a benchmark case whose LSTM backward hands its gate gradients to XLA (``wide``), the train step
compiled two ways:

- ``overwrite``: the backward writes its gate gradients over the saved gates (the default),
- ``own buffer``: the gate gradients get an (L, N, 4H) buffer of their own.

Each setting runs in a process of its own, the two alternating for ``rounds`` rounds (default 4):
a process sets the flag, checks the gradients against ``impl="scan"`` and prints the median wall
time of ``steps`` steps (default 9). Printed first: XLA's memory for the step each way
(temporaries + outputs, from the compiled program's buffer assignment).
"""

import sys

import jax

from experiments.bench.cases import CASES
from experiments.perf.common import alternate, checked_train_ms, problem, train_step
from jlstm import native

SETTINGS = ("overwrite", "own buffer")


def step_mib(case) -> float:
    """MiB of temporaries + outputs XLA assigns to the case's jitted train step."""
    params, x, cot = problem(case)
    memory = train_step(case, cot).lower(params, x).compile().memory_analysis()
    return (memory.temp_size_in_bytes + memory.output_size_in_bytes) / 2**20


def child(name: str, steps: int, setting: str) -> None:
    native.OVERWRITE_SAVED_GATES = setting == "overwrite"
    print(f"{checked_train_ms(CASES[name], steps):.3f}")


def main(name: str, steps: int, rounds: int) -> None:
    for setting in SETTINGS:
        native.OVERWRITE_SAVED_GATES = setting == "overwrite"
        jax.clear_caches()
        print(f"{name} train step, {setting}: {step_mib(CASES[name]):.1f} MiB", flush=True)
    ms = alternate(
        "experiments.perf.saved_gates",
        {s: ([name, str(steps), s], {}) for s in SETTINGS},
        rounds,
    )
    ratios = [a / b for a, b in zip(ms["overwrite"], ms["own buffer"], strict=True)]
    for s in SETTINGS:
        print(f"{name} train, {s}: " + " ".join(f"{t:.1f}" for t in ms[s]) + " ms")
    print("overwrite / own buffer: " + " ".join(f"{r:.2f}" for r in ratios), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        main(
            sys.argv[1],
            int(sys.argv[2]) if len(sys.argv) > 2 else 9,
            int(sys.argv[3]) if len(sys.argv) > 3 else 4,
        )
