"""Backs ``jlstm.native.BLAS_GEMMS``: ``python -m experiments.perf.sequence_gemms [CASES] [ROUNDS]``.
In one process, each case's train step (gradients of ``sum(output * cot)`` for the weights and the
input, as ``make bench``'s train) compiled twice, its whole-sequence backward GEMMs by OpenBLAS in
the C++ team (the default) and by XLA's dots, checked to agree, and called alternately
(experiments.perf.common.alternate_calls); prints the median time per call of each and their ratio.
Only a backward that hands its gate gradients out (past ``WEIGHTS_IN_LOOP_BYTES``: wide, or any case
with ``--gates-out``, which sets that limit to 0) has these GEMMs.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench.cases import CASES
from experiments.perf.common import alternate_calls, layer_and_init, problem
from jlstm import native


def compiled(case, blas: bool):
    """The case's jitted train step, traced with the GEMMs by OpenBLAS or by XLA."""
    layer, _ = layer_and_init(case)
    params, x, cot = problem(case)
    native.BLAS_GEMMS = blas
    jax.clear_caches()  # jlstm's layer stack is jitted: retrace it with the switch
    try:
        loss = lambda p, x: jnp.sum(layer(p, x)[0] * cot)  # noqa: E731
        fn = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile()
    finally:
        native.BLAS_GEMMS = True
    assert ("jlstm_sequence_grads" in fn.as_text()) == blas, "the switch did not take"
    return lambda: jax.block_until_ready(fn(params, x))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cases", nargs="?", default="wide")
    parser.add_argument("rounds", nargs="?", type=int, default=10)
    parser.add_argument("--gates-out", action="store_true", help="WEIGHTS_IN_LOOP_BYTES = 0")
    args = parser.parse_args()
    reason = native.blas_unavailable_reason()
    if reason is not None:
        raise SystemExit(f"OpenBLAS unavailable: {reason}")
    if args.gates_out:
        native.WEIGHTS_IN_LOOP_BYTES = 0
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
    for name in args.cases.split(","):
        runs = {"OpenBLAS": compiled(CASES[name], True), "XLA": compiled(CASES[name], False)}
        got, want = (jax.tree.leaves(f()) for f in runs.values())
        for a, b in zip(got, want, strict=True):
            scale = float(np.max(np.abs(b))) or 1.0
            assert float(np.max(np.abs(np.asarray(a) - b))) <= 1e-4 * scale, name
        med = alternate_calls(runs, args.rounds)
        print(
            f"{name} train step: OpenBLAS {med['OpenBLAS']:.1f} ms, XLA {med['XLA']:.1f} ms, "
            f"ratio {med['OpenBLAS'] / med['XLA']:.3f} ({args.rounds} calls each, alternating)",
            flush=True,
        )


if __name__ == "__main__":
    main()
