"""Backs ``jlstm.native.TRANSPOSE_FIRST``: ``python -m experiments.perf.weight_gemm``. XLA CPU's
whole-sequence weight-gradient GEMM ``dW = sum_t d_t^T v_t`` (``jlstm.loops.weight_grad``) in its two
forms, on this machine, over shapes ``(L*N, K, G)`` (rows, inputs or hidden units, gates):

- ``folded``: ``(v^T @ d)^T`` with v's transpose folded into the dot (the default form),
- ``transpose first``: v's transpose written out, then the dot (``transpose_first=True``),

each checked against the other, timed round-robin in one process; printed: GFLOP/s of each and the
ratio of their times. Shapes as arguments, ``8192,1024,4096 65536,64,512``, or a default set from
the wide case's (8192 rows, 512 and 1024 inputs, 4096 gates) down to 512 gates.
"""

import sys

import jax
import numpy as np

from experiments.perf.common import round_robin
from jlstm import loops

SHAPES = [
    (8192, 1024, 4096),
    (8192, 512, 4096),
    (16384, 2048, 8192),
    (1024, 1024, 4096),
    (4096, 512, 1024),
    (4096, 256, 1024),
    (2048, 128, 512),
    (65536, 64, 512),
]


def compare(rows: int, k: int, gates: int) -> None:
    key = jax.random.key(0)
    d = jax.random.normal(key, (1, rows, gates))
    v = jax.random.normal(jax.random.fold_in(key, 1), (1, rows, k))
    forms = {
        name: jax.jit(lambda d, v, first=first: loops.weight_grad(d, v, first))
        for name, first in (("folded", False), ("transpose first", True))
    }
    want = np.asarray(forms["folded"](d, v))
    got = np.asarray(forms["transpose first"](d, v))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3 * np.abs(want).max())
    med = round_robin({n: (lambda f=f: f(d, v)) for n, f in forms.items()}, samples=7)
    flops = 2 * rows * k * gates
    rate = {n: flops / med[n][0] / 1e9 for n in forms}
    print(
        f"  ({rows}, {k}, {gates}): folded {rate['folded']:6.1f}  transpose first "
        f"{rate['transpose first']:6.1f} GFLOP/s  time ratio {med['transpose first'][0] / med['folded'][0]:.2f}",
        flush=True,
    )


def main(args: list[str]) -> None:
    shapes = [tuple(int(n) for n in a.split(",")) for a in args] or SHAPES
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}: dW = d^T v, (L*N, K, G)")
    for shape in shapes:
        compare(*shape)


if __name__ == "__main__":
    main(sys.argv[1:])
