# ruff: noqa: E741, B023  (B, T, I, H as in the issue; loop closures run within their iteration)
"""Prototype of one LSTM direction for XLA CPU (custom_vjp), to measure proposals for jlstm.recurrence.

Differences from jlstm.recurrence (the core at 66c614f), each switchable to measure it alone:
  wt       the step's matmuls use weights transposed once before the loop, (in, 4H) layout:
           XLA CPU's small dots are much slower with a transposed right-hand side
  concat   one dot per step on [x_t, h] @ [W_ih; W_hh]^T instead of two; the forward saves
           [x_t, h_{t-1}] so the backward forms dW_ih and dW_hh in one GEMM
  dw       "einsum": the core's einsum("tng,tnh->gh") (XLA copies both operands to transpose them);
           "2d": reshape to 2-D first, (T*N, G)^T @ (T*N, H): no copies;
           "gtn": the backward loop writes dgates^T into a (G, T, N) buffer so the GEMM is plain NN
Unmasked (no seq_lengths), forward direction only: enough to time the kernels.
"""

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax


def _scales(H, dtype):
    half, one, zero = (jnp.full((H,), v, dtype) for v in (0.5, 1.0, 0.0))
    return jnp.concatenate([half, half, one, half]), jnp.concatenate([half, half, zero, half])


def _forward(w_ih, w_hh, bias, x, h0, c0, wt, concat):
    H = h0.shape[-1]
    scale, offset = _scales(H, x.dtype)
    if concat:
        w = jnp.concatenate([w_ih, w_hh], axis=1).T  # (I + H, 4H)
    elif wt:
        w_ih_t, w_hh_t = w_ih.T, w_hh.T

    def step(carry, x_t):
        h, c = carry
        if concat:
            xh = jnp.concatenate([x_t, h], axis=-1)
            pre = xh @ w + bias
        elif wt:
            pre = x_t @ w_ih_t + h @ w_hh_t + bias
        else:
            pre = x_t @ w_ih.T + h @ w_hh.T + bias
        acts = jnp.tanh(pre * scale) * scale + offset
        i, f, g, o = jnp.split(acts, 4, axis=-1)
        c_new = f * c + i * g
        tanh_c = jnp.tanh(c_new)
        h_new = o * tanh_c
        saved = (acts, tanh_c, xh if concat else h, c)
        return (h_new, c_new), (h_new, saved)

    (h_n, c_n), (ys, saved) = lax.scan(step, (h0, c0), x)
    return (ys, h_n, c_n), saved


@partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def lstm_layer(w_ih, w_hh, bias, x, h0, c0, wt=True, concat=False, dw="2d"):
    return _forward(w_ih, w_hh, bias, x, h0, c0, wt, concat)[0]


def _fwd(w_ih, w_hh, bias, x, h0, c0, wt, concat, dw):
    out, saved = _forward(w_ih, w_hh, bias, x, h0, c0, wt, concat)
    return out, (w_ih, w_hh, x, saved)


def _bwd(wt, concat, dw, res, cts):
    w_ih, w_hh, x, (acts, tanh_cs, hs, cs_prev) = res
    dys, dh_n, dc_n = cts
    T, N, G = acts.shape
    I = x.shape[-1]

    def cell_grads(dh, dc, dy, act, tanh_c, c_prev):
        i, f, g, o = jnp.split(act, 4, axis=-1)
        dh_total = dh + dy
        dc_total = dc + dh_total * o * (1 - tanh_c * tanh_c)
        d_i = dc_total * g * i * (1 - i)
        d_f = dc_total * c_prev * f * (1 - f)
        d_g = dc_total * i * (1 - g * g)
        d_o = dh_total * tanh_c * o * (1 - o)
        return jnp.concatenate([d_i, d_f, d_g, d_o], axis=-1), dc_total * f

    if dw == "gtn":

        def step(carry, inputs):
            dh, dc, buf, t = carry
            dgates, dc_prev = cell_grads(dh, dc, *inputs)
            buf = lax.dynamic_update_slice(buf, dgates.T[:, None, :], (0, t, 0))
            return (dgates @ w_hh, dc_prev, buf, t - 1), None

        buf = jnp.zeros((G, T, N), x.dtype)
        (dh0, dc0, buf, _), _ = lax.scan(
            step, (dh_n, dc_n, buf, T - 1), (dys, acts, tanh_cs, cs_prev), reverse=True
        )
        dg2 = buf.reshape(G, T * N)  # (G, T*N): the weight GEMMs below are plain NN
        dgates = None
    else:

        def step(carry, inputs):
            dh, dc = carry
            dgates, dc_prev = cell_grads(dh, dc, *inputs)
            return (dgates @ w_hh, dc_prev), dgates

        (dh0, dc0), dgates = lax.scan(
            step, (dh_n, dc_n), (dys, acts, tanh_cs, cs_prev), reverse=True
        )
    if dw == "einsum":
        src = hs[..., I:] if concat else hs
        dw_hh = jnp.einsum("tng,tnh->gh", dgates, src)
        dw_ih = jnp.einsum("tng,tni->gi", dgates, x)
        db = jnp.sum(dgates, axis=(0, 1))
        dx = dgates @ w_ih
    else:
        if dw == "2d":
            d2 = dgates.reshape(T * N, G)
            db = d2.sum(0)
            dx = (d2 @ w_ih).reshape(T, N, I)

            def gemm(a):  # (G, k) = d2^T @ a, as (a^T @ d2)^T so XLA keeps the 2-D operands
                return (a.reshape(T * N, -1).T @ d2).T

        else:
            db = dg2.sum(1)
            dx = (dg2.T @ w_ih).reshape(T, N, I)

            def gemm(a):
                return dg2 @ a.reshape(T * N, -1)

        if concat:
            dw_cat = gemm(hs)
            dw_ih, dw_hh = dw_cat[:, :I], dw_cat[:, I:]
        else:
            dw_ih, dw_hh = gemm(x), gemm(hs)
    return dw_ih, dw_hh, db, dx, dh0, dc0


lstm_layer.defvjp(_fwd, _bwd)


def lstm(params, x, wt=True, concat=False, dw="2d"):
    """Single-layer unidirectional torch-named params -> (output, (h_n, c_n)), time-major."""
    w_ih, w_hh = params["weight_ih_l0"], params["weight_hh_l0"]
    bias = params["bias_ih_l0"] + params["bias_hh_l0"]
    z = jnp.zeros((x.shape[1], w_hh.shape[1]), x.dtype)
    ys, h, c = lstm_layer(w_ih, w_hh, bias, x, z, z, wt, concat, dw)
    return ys, (h, c)
