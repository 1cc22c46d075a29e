# ruff: noqa: E741, B023  (B, T, I, H as in the issue; loop closures run within their iteration)
"""GRU forward on XLA CPU: jlstm's core vs the same step with weights transposed before the loop.

taskset -c 1 python -m experiments.prototypes.gru_wt long medium
"""

import sys
from functools import partial

import jax.numpy as jnp
import numpy as np
import torch
from jax import lax

import jlstm
from experiments.prototypes.common import (
    CASES,
    compile_fn,
    rel_err,
    report,
    round_robin,
    torch_lstm,
)


def gru_wt(p, x):
    w_ih_t, w_hh_t = p["weight_ih_l0"].T, p["weight_hh_l0"].T
    b_ih, b_hh = p["bias_ih_l0"], p["bias_hh_l0"]
    H = w_hh_t.shape[0]
    b = b_ih + jnp.concatenate([b_hh[: 2 * H], jnp.zeros((H,), x.dtype)])
    b_hn = b_hh[2 * H :]

    def step(h, x_t):
        xw = x_t @ w_ih_t + b
        hw = h @ w_hh_t
        rz = 0.5 * jnp.tanh(0.5 * (xw[:, : 2 * H] + hw[:, : 2 * H])) + 0.5
        r, z = rz[:, :H], rz[:, H:]
        n = jnp.tanh(xw[:, 2 * H :] + r * (hw[:, 2 * H :] + b_hn))
        h = n + z * (h - n)
        return h, h

    h, ys = lax.scan(step, jnp.zeros((x.shape[1], H), x.dtype), x)
    return ys, h


def main(names):
    torch.set_num_threads(1)
    for name in names:
        B, T, I, H = CASES[name]
        m, p, x, _ = torch_lstm(B, T, I, H, cell="gru")
        xt = torch.from_numpy(np.array(x))
        with torch.inference_mode():
            want = m(xt)[0].numpy()
        fns = {}
        for n, f in [("core", lambda p, x: jlstm.gru(p, x)), ("W^T", gru_wt)]:
            c = compile_fn(f, p, x)
            assert rel_err(c(p, x)[0], want) < 1e-4, n
            fns[n] = partial(c, p, x)

        def run_torch():
            with torch.inference_mode():
                m(xt)

        fns["torch 1t"] = run_torch
        report(f"{name} GRU fwd (B,T,I,H)={B, T, I, H}", round_robin(fns), "core", per=T)


if __name__ == "__main__":
    main(sys.argv[1:] or ["long", "medium"])
