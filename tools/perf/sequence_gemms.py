"""``jlstm.native.BLAS_GEMMS``, OpenBLAS against XLA: ``python -m tools.perf.sequence_gemms
[CASES] [ROUNDS]``. In one process, for each case:

- **the GEMMs**: dW_ih, dW_hh and dx of one direction from random gate gradients, as the C++ team's
  OpenBLAS calls (``jlstm.native``'s ``jlstm_sequence_grads``) and in XLA's form (the transposes,
  h_{t-1} and the dots of ``jlstm.loops``), each jitted alone, checked to agree, called alternately;
- **the train step**: gradients of ``sum(output * cot)`` for the weights and the input (as ``make
  bench``'s train), compiled with either, checked to agree, called alternately.

Prints the median time per call of each (the GEMMs also in GFLOP/s) and their ratio
(:func:`alternate_calls`), and the train step's temporary buffers (XLA's buffer
assignment of the compiled step). Only a backward that hands its gate gradients out (past
``WEIGHTS_IN_LOOP_BYTES``: wide, or any case with ``--gates-out``, which sets that limit to 0) has
these GEMMs.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench.cases import CASES
from experiments.bench.timing import max_rel_err
from jlstm import loops, native
from tools.perf.profile_case import layer_and_init, problem


def alternate_calls(runs: dict, rounds: int) -> dict:
    """``runs``: name -> zero-argument callable that waits for its result. Calls each once per
    round, the order reversing from round to round, so that a machine whose speed drifts treats
    all alike; returns name -> median milliseconds per call."""
    times = {k: [] for k in runs}
    for r in range(rounds):
        for k in list(runs) if r % 2 == 0 else list(runs)[::-1]:
            start = time.perf_counter()
            runs[k]()
            times[k].append(time.perf_counter() - start)
    return {k: statistics.median(t) * 1e3 for k, t in times.items()}


def _agree(got, want, what: str) -> None:
    """Every array within 1e-4 of its largest entry, as experiments.bench checks against torch."""
    got, want = (dict(enumerate(np.asarray(a) for a in jax.tree.leaves(t))) for t in (got, want))
    err = max_rel_err(got, want)
    assert err <= 1e-4, f"{what}: OpenBLAS and XLA differ by {err:.1e}"


def gemms(case, rounds: int) -> str:
    """The three GEMMs alone on the case's first layer's shapes, OpenBLAS against XLA."""
    length, batch, inp, hidden = case.seq_len, case.batch, case.input_size, case.hidden_size
    gates = 4 * hidden if case.cell == "lstm" else 3 * hidden
    keys = jax.random.split(jax.random.key(0), 5)
    dg = jax.random.normal(keys[0], (length, batch, gates))
    x = jax.random.normal(keys[1], (length, batch, inp))
    hs = jax.random.normal(keys[2], (length, batch, hidden))
    h0 = jax.random.normal(keys[3], (batch, hidden))
    w_ih = jax.random.normal(keys[4], (gates, inp))
    first = native.TRANSPOSE_FIRST

    def xla(dg, x, hs, h0, w_ih):
        dw_ih, _, dx = loops.input_grads(dg, x, w_ih, first)
        return dw_ih, loops.weight_grad(dg, loops.previous(hs, h0, False), first), dx

    blas = jax.jit(lambda *a: native._sequence_grads(a[0], *a, False, True))
    xla = jax.jit(xla)
    args = (dg, x, hs, h0, w_ih)
    _agree(blas(*args), xla(*args), "GEMMs")
    med = alternate_calls(
        {
            "OpenBLAS": lambda: jax.block_until_ready(blas(*args)),
            "XLA": lambda: jax.block_until_ready(xla(*args)),
        },
        rounds,
    )
    flops = 2 * length * batch * gates * (2 * inp + hidden)
    rate = {k: flops / (v * 1e-3) / 1e9 for k, v in med.items()}
    return (
        f"GEMMs: OpenBLAS {med['OpenBLAS']:.1f} ms ({rate['OpenBLAS']:.0f} GFLOP/s), XLA "
        f"{med['XLA']:.1f} ms ({rate['XLA']:.0f} GFLOP/s), ratio {med['OpenBLAS'] / med['XLA']:.3f}"
    )


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
    temp_mib = fn.memory_analysis().temp_size_in_bytes / 2**20
    return (lambda: jax.block_until_ready(fn(params, x))), temp_mib


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
        print(f"{name} {gemms(CASES[name], args.rounds)}", flush=True)
        (blas, blas_mib), (xla, xla_mib) = (compiled(CASES[name], b) for b in (True, False))
        runs = {"OpenBLAS": blas, "XLA": xla}
        _agree(blas(), xla(), name)
        med = alternate_calls(runs, args.rounds)
        print(
            f"{name} train step: OpenBLAS {med['OpenBLAS']:.1f} ms, XLA {med['XLA']:.1f} ms, "
            f"ratio {med['OpenBLAS'] / med['XLA']:.3f} ({args.rounds} calls each, alternating); "
            f"XLA's temporaries {blas_mib:.1f} MiB against {xla_mib:.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
