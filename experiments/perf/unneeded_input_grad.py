"""Backs BENCHMARKS.md's figures for the backward that leaves out the input's gradient when nothing
differentiates the input (the data a first layer reads in a training program): ``python -m
experiments.perf.unneeded_input_grad [CASES] [ROUNDS]``. In one process, each case's gradient of
the weights alone compiled twice, with the C++ backward skipping dx (the default) and forming it
anyway (``jlstm.native._dx_shape`` patched while tracing), checked to give the same bits, and
called alternately (experiments.perf.common.alternate_calls); prints the median time per call of
each and their ratio. Cases whose backward hands its gate gradients to XLA (wide) are left out:
XLA drops an unused dx itself.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench.cases import CASES
from experiments.perf.common import alternate_calls, layer_and_init, problem
from jlstm import native


def compiled(case, skip: bool):
    """The case's jitted gradient of ``sum(output * cot)`` for the weights, traced with the
    backward skipping dx or not."""
    layer, _ = layer_and_init(case)
    params, x, cot = problem(case)
    shape = native._dx_shape
    native._dx_shape = shape if skip else (lambda x, needed: x.shape)
    jax.clear_caches()  # jlstm's layer stack is jitted: retrace it with the switch
    try:
        loss = lambda p: jnp.sum(layer(p, x)[0] * cot)  # noqa: E731
        fn = jax.jit(jax.grad(loss)).lower(params).compile()
    finally:
        native._dx_shape = shape
    assert ("f32[0]" in fn.as_text()) == skip, "the switch did not take"
    return lambda: jax.block_until_ready(fn(params))


def main(names: str = "mnist,long,small,medium,gru,small-gru", rounds: int = 40) -> None:
    for name in names.split(","):
        runs = {
            "dx skipped": compiled(CASES[name], True),
            "dx formed": compiled(CASES[name], False),
        }
        got, want = (jax.tree.leaves(f()) for f in runs.values())
        assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True)), name
        med = alternate_calls(runs, rounds)
        print(
            f"{name} weights' gradients: dx skipped {med['dx skipped']:.2f} ms, dx formed "
            f"{med['dx formed']:.2f} ms, ratio {med['dx skipped'] / med['dx formed']:.3f}"
            f" ({rounds} calls each, alternating)",
            flush=True,
        )


if __name__ == "__main__":
    main(*sys.argv[1:2], *(int(a) for a in sys.argv[2:3]))
