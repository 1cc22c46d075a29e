# ruff: noqa: E741, B023  (B, T, I, H as in the issue; loop closures run within their iteration)
"""Where the time of one LSTM layer's forward goes on XLA CPU, step by step.

    python -m experiments.prototypes.fwd_profile long mnist

Variants (all single layer, unidirectional, time-major, same weights, checked against torch):
  jlstm           the core today (impl="auto": custom_vjp, projection in the step on CPU, one tanh)
  jlstm scan      impl="scan": autodiff path, projection hoisted out of the loop
  flax            flax.linen.RNN(OptimizedLSTMCell)
  torch 1t        torch.nn.LSTM, 1 thread (oneDNN)
  2dot+1tanh      minimal loop: x_t@Wih.T + h@Whh.T, one tanh over the 4H block
  2dot+sigmoid    same, jax.nn.sigmoid on i,f,o and tanh on g (flax's math)
  1dot concat     [x_t, h] @ [Wih, Whh].T: one dot per step
  dots only       the two dots and a cheap elementwise tail: the matmul floor of a step
  (W^T)           weights passed pre-transposed, (in, 4H) as flax stores them
"""

import sys
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import torch

import jlstm
from experiments.bench import CASES as BENCH_CASES
from experiments.bench import FlaxStack, to_flax
from experiments.prototypes.common import (
    CASES,
    compile_fn,
    rel_err,
    report,
    round_robin,
    torch_lstm,
)


def one_tanh(gates, c, H):
    s = jnp.concatenate([jnp.full((2 * H,), 0.5), jnp.ones((H,)), jnp.full((H,), 0.5)])
    o = jnp.concatenate([jnp.full((2 * H,), 0.5), jnp.zeros((H,)), jnp.full((H,), 0.5)])
    a = jnp.tanh(gates * s) * s + o
    i, f, g, o = jnp.split(a, 4, axis=-1)
    c = f * c + i * g
    return o * jnp.tanh(c), c


def sigmoids(gates, c, H):
    i, f, g, o = jnp.split(gates, 4, axis=-1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    return jax.nn.sigmoid(o) * jnp.tanh(c), c


def loop(kind):
    def f(p, x):
        w_ih, w_hh = p["weight_ih_l0"], p["weight_hh_l0"]
        b = p["bias_ih_l0"] + p["bias_hh_l0"]
        H, B = w_hh.shape[1], x.shape[1]
        w_cat = jnp.concatenate([w_ih, w_hh], axis=1)
        if "(W^T)" in kind:  # weights laid out (in, out) as flax keeps them
            w_ih_t, w_hh_t = p["w_ih_t"], p["w_hh_t"]
            w_cat_t = jnp.concatenate([w_ih_t, w_hh_t], axis=0)

        def step(carry, xt):
            h, c = carry
            if kind == "1dot concat (W^T)":
                gates = jnp.concatenate([xt, h], axis=-1) @ w_cat_t + b
            elif kind == "hoist (W^T)":
                gates = xt + h @ w_hh_t
            elif kind == "hoist (W^T) barrier":  # the slice of xw materialised on its own
                gates = jax.lax.optimization_barrier(xt) + h @ w_hh_t
            elif kind == "1dot concat":
                gates = jnp.concatenate([xt, h], axis=-1) @ w_cat.T + b
            elif kind == "elementwise":
                gates = jnp.tile(h, 4) + jnp.tile(xt[:, :1], 4 * H) + b
            elif "(W^T)" in kind:
                gates = xt @ w_ih_t + h @ w_hh_t + b
            else:
                gates = xt @ w_ih.T + h @ w_hh.T + b
            if kind.startswith("dots only"):
                h = gates[:, :H] * 0.01
                return (h, c), h
            h, c = (sigmoids if kind == "2dot+sigmoid" else one_tanh)(gates, c, H)
            return (h, c), h

        z = jnp.zeros((B, H), x.dtype)
        if kind.startswith("chunk-hoist"):  # input projection per chunk of C steps (C*N ~ 512 rows)
            T = x.shape[0]
            C = max(1, min(T, int(kind.split()[1]) // B))
            while T % C:
                C -= 1

            def inner(carry, xw_t):
                h, c = carry
                h, c = one_tanh(xw_t + h @ w_hh_t, c, H)
                return (h, c), h

            def chunk(carry, x_c):
                xw = (x_c.reshape(C * B, -1) @ w_ih_t + b).reshape(C, B, 4 * H)
                return jax.lax.scan(inner, carry, xw)

            (h, c), ys = jax.lax.scan(chunk, (z, z), x.reshape(T // C, C, B, -1))
            return ys.reshape(T, B, H), (h, c)
        if kind.startswith("hoist"):
            x = x @ w_ih_t + b
        (h, c), ys = jax.lax.scan(step, (z, z), x)
        return ys, (h, c)

    return f


def main(names):
    torch.set_num_threads(1)
    for name in names:
        B, T, I, H = CASES[name]
        m, p, x, _ = torch_lstm(B, T, I, H)
        xt = torch.from_numpy(np.array(x))
        with torch.inference_mode():
            want = m(xt)[0].numpy()
        variants = {
            "jlstm": lambda p, x: jlstm.lstm(p, x),
            **{
                k: loop(k)
                for k in [
                    "2dot+1tanh (W^T)",
                    "hoist (W^T)",
                    "chunk-hoist 256 (W^T)",
                    "chunk-hoist 512 (W^T)",
                    "chunk-hoist 2048 (W^T)",
                    "dots only (W^T)",
                ]
            },
        }
        pt = p | {"w_ih_t": p["weight_ih_l0"].T.copy(), "w_hh_t": p["weight_hh_l0"].T.copy()}
        fns = {}
        for n, f in variants.items():
            p = (
                pt
                if "W^T" in n
                else {k: v for k, v in pt.items() if k.startswith(("weight", "bias"))}
            )
            c = compile_fn(f, p, x)
            if not n.startswith("dots only"):
                err = rel_err(c(p, x)[0], want)
                assert err < 1e-4, (n, err)
            fns[n] = partial(c, p, x)
        case = BENCH_CASES["mnist"]._replace(batch=B, seq_len=T, input_size=I, hidden_size=H)
        fp = to_flax(p, case)
        fns["flax"] = partial(compile_fn(FlaxStack("lstm", H, 1, False).apply, fp, x), fp, x)

        def torch_fwd():
            with torch.inference_mode():
                m(xt)

        fns["torch 1t"] = torch_fwd
        report(f"{name} fwd (B,T,I,H)={B, T, I, H}", round_robin(fns), "jlstm", per=T)


if __name__ == "__main__":
    main(sys.argv[1:] or ["long", "mnist"])
