# ruff: noqa: E741, B023  (B, T, I, H as in the issue; loop closures run within their iteration)
"""The LSTM backward loop alone (long case): what each part of a step costs on XLA CPU.

python -m experiments.prototypes.bwd_loop
"""

from functools import partial

import jax.numpy as jnp
import numpy as np
from jax import lax

from experiments.prototypes.common import compile_fn, report, round_robin


def cell_grads(dh, dc, dy, act, tanh_c, c_prev):
    i, f, g, o = jnp.split(act, 4, axis=-1)
    dh_total = dh + dy
    dc_total = dc + dh_total * o * (1 - tanh_c * tanh_c)
    d_i = dc_total * g * i * (1 - i)
    d_f = dc_total * c_prev * f * (1 - f)
    d_g = dc_total * i * (1 - g * g)
    d_o = dh_total * tanh_c * o * (1 - o)
    return jnp.concatenate([d_i, d_f, d_g, d_o], axis=-1), dc_total * f


def cell_grads_block(dh, dc, dy, act, tanh_c, c_prev):
    """Same maths with whole-block (N, 4H) products instead of four (N, H) pieces."""
    i, f, g, o = jnp.split(act, 4, axis=-1)
    dh_total = dh + dy
    dc_total = dc + dh_total * o * (1 - tanh_c * tanh_c)
    # d pre-activation = upstream * derivative; derivative of the scaled tanh: s * (1 - t^2) where
    # t = (a - offset) / s, i.e. a * (1 - a) for sigmoid gates and 1 - g^2 for g
    up = jnp.concatenate([dc_total * g, dc_total * c_prev, dc_total * i, dh_total * tanh_c], -1)
    H = g.shape[-1]
    is_g = (jnp.arange(4 * H) // H == 2)[None, :]
    deriv = jnp.where(is_g, 1 - act * act, act * (1 - act))
    return up * deriv, dc_total * f


def cell_grads_gate_axis(dh, dc, dy, act, tanh_c, c_prev):
    """No concatenate: everything on an (N, 4, H) view with selects along the gate axis, so XLA
    can emit dgates as a single loop fusion."""
    N, H = dh.shape
    a = act.reshape(N, 4, H)
    i, f, g, o = a[:, 0], a[:, 1], a[:, 2], a[:, 3]
    dh_total = dh + dy
    dc_total = dc + dh_total * o * (1 - tanh_c * tanh_c)
    k = lax.broadcasted_iota(jnp.int32, (1, 4, 1), 1)
    other = jnp.where(
        k == 0,
        g[:, None],
        jnp.where(k == 1, c_prev[:, None], jnp.where(k == 2, i[:, None], tanh_c[:, None])),
    )
    upstream = jnp.where(k == 3, dh_total[:, None], dc_total[:, None])
    deriv = jnp.where(k == 2, 1 - a * a, a * (1 - a))
    return (upstream * other * deriv).reshape(N, 4 * H), dc_total * f


def make_pre(variant):
    """Backward loop when the forward saved the derivative factors: P = [g i(1-i), c_prev f(1-f),
    i (1-g^2), tanh_c o(1-o)] (N, 4H), A = o (1 - tanh_c^2) and f (N, H): per step only
    dc = dc + (dh + dy) A;  dgates = P * [dc, dc, dc, dh + dy];  dc_prev = dc f;  dh_prev = dgates W."""

    def run(w_hh, dys, P, A, F, dh_n, dc_n):
        G = P.shape[-1]
        is_o = (jnp.arange(G) >= 3 * G // 4)[None, :]

        def step(carry, inputs):
            dh, dc = carry
            dy, p, a, f = inputs
            dh_total = dh + dy
            dc_total = dc + dh_total * a
            if variant == "tile":
                u = jnp.where(is_o, jnp.tile(dh_total, 4), jnp.tile(dc_total, 4))
            else:
                u = jnp.concatenate([dc_total, dc_total, dc_total, dh_total], axis=-1)
            dgates = p * u
            return (dgates @ w_hh, dc_total * f), dgates

        (dh0, dc0), dg = lax.scan(step, (dh_n, dc_n), (dys, P, A, F), reverse=True)
        return dh0, dc0, dg

    return run


def make(variant):
    def run(w_hh, dys, acts, tanh_cs, cs_prev, dh_n, dc_n):
        cg = {
            "block elementwise": cell_grads_block,
            "gate axis": cell_grads_gate_axis,
            "gate axis, in place": cell_grads_gate_axis,
        }.get(variant, cell_grads)
        if variant == "gate axis, in place":  # dgates overwrite acts in the same buffer

            def step(carry, inputs):
                dh, dc, buf, t = carry
                act = lax.dynamic_index_in_dim(buf, t, keepdims=False)
                dgates, dc_prev = cg(dh, dc, inputs[0], act, *inputs[1:])
                buf = lax.dynamic_update_index_in_dim(buf, dgates, t, 0)
                return (dgates @ w_hh, dc_prev, buf, t - 1), None

            T = acts.shape[0]
            (dh0, dc0, dg, _), _ = lax.scan(
                step, (dh_n, dc_n, acts, T - 1), (dys, tanh_cs, cs_prev), reverse=True
            )
            return dh0, dc0, dg

        def step(carry, inputs):
            dh, dc = carry
            if variant == "no slices (same inputs every step)":
                inputs = (dys[0], acts[0], tanh_cs[0], cs_prev[0])
            dgates, dc_prev = cg(dh, dc, *inputs)
            if variant == "elementwise only":
                dh_prev = dgates[:, : dh.shape[1]] * 0.5
            else:
                dh_prev = dgates @ w_hh
            if variant == "dgates materialised, then output":
                dgates = lax.optimization_barrier(dgates)
            out = None if variant == "no dgates output" else dgates
            return (dh_prev, dc_prev), out

        (dh0, dc0), dg = lax.scan(step, (dh_n, dc_n), (dys, acts, tanh_cs, cs_prev), reverse=True)
        return dh0, dc0, dg

    return run


def main(T=1024, N=16, H=128, profile=True):
    rng = np.random.default_rng(0)
    G = 4 * H

    def arr(*s, lo=-1.0, hi=1.0):
        return jnp.asarray(rng.uniform(lo, hi, s).astype(np.float32))

    args = (
        arr(G, H, lo=-0.05, hi=0.05),
        arr(T, N, H),
        arr(T, N, G, lo=0, hi=1),
        arr(T, N, H),
        arr(T, N, H),
        arr(N, H),
        arr(N, H),
    )
    names = ["full step", "no dgates output", "elementwise only"]
    fns = {n: partial(compile_fn(make(n), *args), *args) for n in names}
    ref = fns["full step"]()
    # the same gradients from forward-saved derivative factors
    w_hh, dys, acts, tanh_cs, cs_prev, dh_n, dc_n = args
    i, f, g, o = jnp.split(acts, 4, axis=-1)
    P = jnp.concatenate(
        [g * i * (1 - i), cs_prev * f * (1 - f), i * (1 - g * g), tanh_cs * o * (1 - o)], -1
    )
    pre_args = (w_hh, dys, P, o * (1 - tanh_cs * tanh_cs), f, dh_n, dc_n)
    for v in ["concat", "tile"]:
        n = f"saved factors ({v})"
        fns[n] = partial(compile_fn(make_pre(v), *pre_args), *pre_args)
        print(
            n,
            "== full step:",
            [float(jnp.max(jnp.abs(a - b))) for a, b in zip(ref, fns[n](), strict=True)],
        )
    report(f"backward loop (T,N,H)={T, N, H}", round_robin(fns), "full step", per=T)
    if profile:
        from experiments.prototypes.xprof import op_table

        print("full step")
        op_table(compile_fn(make("full step"), *args), args, steps=T, top=12)
        print("saved factors (tile)")
        op_table(compile_fn(make_pre("tile"), *pre_args), pre_args, steps=T, top=12)


if __name__ == "__main__":
    main()
