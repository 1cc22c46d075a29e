# ruff: noqa: E741, B023  (B, T, I, H as in the issue; loop closures run within their iteration)
"""The LSTM backward's after-loop work (dW_hh, dW_ih, db, dx from every step's gate gradients).

    taskset -c 1 python -m experiments.prototypes.post_loop long medium wide mnist

core:     jlstm.recurrence today: einsum("tng,tnh->gh"), einsum("tng,tni->gi"), sum, dgates @ W_ih
chunked:  one lax.scan over chunks of C time steps: acc += h_c^T @ d_c, acc += x_c^T @ d_c (the
          large operand d_c on the right, K = C*N rows that stay in cache), db += sum, dx_c = d_c @ W_ih
"""

import sys
from functools import partial

import jax.numpy as jnp
import numpy as np
import torch
from jax import lax

from experiments.prototypes.common import CASES, compile_fn, report, round_robin


def core(d, h, x, w_ih):
    return (
        jnp.einsum("tng,tnh->gh", d, h),
        jnp.einsum("tng,tni->gi", d, x),
        jnp.sum(d, axis=(0, 1)),
        d @ w_ih,
    )


def chunked(d, h, x, w_ih, steps=64):
    T, N, G = d.shape
    C = max(1, min(T, steps))
    while T % C:  # largest divisor of T not above `steps`
        C -= 1
    dc, hc, xc = (a.reshape(T // C, C * N, a.shape[-1]) for a in (d, h, x))

    def body(acc, chunk):
        a_hh, a_ih, a_b = acc
        d_c, h_c, x_c = chunk
        return (a_hh + h_c.T @ d_c, a_ih + x_c.T @ d_c, a_b + d_c.sum(0)), d_c @ w_ih

    zeros = (jnp.zeros((h.shape[-1], G)), jnp.zeros((x.shape[-1], G)), jnp.zeros((G,)))
    (a_hh, a_ih, a_b), dx = lax.scan(body, zeros, (dc, hc, xc))
    return a_hh.T, a_ih.T, a_b, dx.reshape(T, N, -1)


def main(names):
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    for name in names:
        B, T, I, H = CASES[name]
        G = 4 * H
        args = tuple(
            jnp.asarray(rng.standard_normal(s, np.float32))
            for s in [(T, B, G), (T, B, H), (T, B, I), (G, I)]
        )
        want = core(*args)
        fns = {"core": partial(compile_fn(core, *args), *args)}
        for C in (16, 64, 256):
            f = partial(chunked, steps=C)
            c = compile_fn(f, *args)
            got = c(*args)
            err = max(
                float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
                for a, b in zip(got, want, strict=True)
            )
            assert err < 1e-5, (name, C, err)
            fns[f"chunked {C} steps"] = partial(c, *args)
        dt, ht, xt, wt = (torch.from_numpy(np.array(a)).reshape(-1, a.shape[-1]) for a in args)
        fns["torch (same 4 ops)"] = lambda: (dt.T @ ht, dt.T @ xt, dt.sum(0), dt @ wt, None)[-1]
        report(
            f"{name} after-loop (B,T,I,H)={B, T, I, H}", round_robin(fns, samples=5), "core", per=T
        )


if __name__ == "__main__":
    main(sys.argv[1:] or ["long", "medium", "wide", "mnist"])
