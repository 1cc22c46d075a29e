"""Backs BENCHMARKS.md's figures for a bidirectional layer's two directions in one C++ call at
inference (csrc/recurrence.cc, run_forward): ``python -m experiments.perf.bidirectional_pair
[CASES] [ROUNDS]``. In one process, the forward of each bidirectional case (default medium,gru)
compiled twice, with both directions in one call and one call per direction, alternating call by
call in every round so that a machine whose speed drifts treats both alike; prints the median time
per call of each and their ratio.
"""

import dataclasses
import sys

import jax
import jax.numpy as jnp

from experiments.bench.cases import CASES
from experiments.perf.common import alternate_calls, layer_and_init, problem
from jlstm import backends


def compiled(case, pair: bool):
    """The case's jitted forward, traced with the native backend's pair on or off."""
    layer, _ = layer_and_init(case)
    params, x, _ = problem(case)
    native = backends.BACKENDS["native"]
    backends.BACKENDS["native"] = native if pair else dataclasses.replace(native, pair=None)
    jax.clear_caches()  # jlstm's layer stack is jitted: retrace it with the switch
    try:
        fn = jax.jit(lambda p, x: jnp.sum(layer(p, x)[0])).lower(params, x).compile()
    finally:
        backends.BACKENDS["native"] = native
    text = fn.as_text()
    assert ("inference_pair" in text) == pair, "the pair switch did not take"
    return lambda: jax.block_until_ready(fn(params, x))


def main(names: str = "medium,gru", rounds: int = 20) -> None:
    for name in names.split(","):
        runs = {
            "one call": compiled(CASES[name], True),
            "a call each": compiled(CASES[name], False),
        }
        med = alternate_calls(runs, rounds)
        print(
            f"{name} fwd: both directions in one call {med['one call']:.2f} ms, a call per "
            f"direction {med['a call each']:.2f} ms, ratio {med['one call'] / med['a call each']:.3f}"
            f" ({rounds} calls each, alternating)"
        )


if __name__ == "__main__":
    main(*sys.argv[1:2], *(int(a) for a in sys.argv[2:3]))
