"""The time loop of one direction with a hand-written backward pass (``jax.custom_vjp``).

Autodiff through ``lax.scan`` accumulates ``dW_hh`` step by step inside the backward loop: one small
``(G*H, N) @ (N, H)`` matmul per step plus a carried accumulator. cuDNN and oneDNN instead keep the
gate gradients of every step and form the weight gradient as one large matmul after the loop; this
module does the same. The forward saves what the backward needs (gate activations, ``tanh(c)``, the
previous states) so the backward loop holds only elementwise work and ``dgates @ W_hh``.

Inputs are the hoisted input projections ``xw`` (``(L, N, G*H)``, biases folded in as in
:mod:`jlstm.cells`), so the input weights' gradients come from ordinary autodiff of that one matmul.
``valid`` (``(L, N, 1)`` bool or None) gives packed-sequence semantics exactly as
:func:`jlstm.layers._masked`: invalid steps keep the carry and output zeros.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax


def _where(valid, new, old):
    return new if valid is None else jnp.where(valid, new, old)


def _steps(xw, valid):
    return xw if valid is None else (xw, valid)


def _split(inputs, masked):
    return inputs if masked else (inputs, None)


def _gate_scales(hidden: int, dtype) -> tuple[jax.Array, jax.Array]:
    """Per-column (scale, offset) so that one tanh over the whole i,f,g,o block gives every gate:
    sigmoid(x) = 0.5 * tanh(0.5 x) + 0.5 for i, f, o and tanh(x) for g."""
    half, one, zero = (jnp.full((hidden,), v, dtype) for v in (0.5, 1.0, 0.0))
    return jnp.concatenate([half, half, one, half]), jnp.concatenate([half, half, zero, half])


# --------------------------------------------------------------------------------------------
# LSTM


def _lstm_forward(w_hh, xw, h0, c0, valid, reverse, unroll):
    scale, offset = (v[None, :] for v in _gate_scales(c0.shape[-1], xw.dtype))  # (1, 4H)

    def step(carry, inputs):
        h, c = carry
        xw_t, valid_t = _split(inputs, valid is not None)
        acts = jnp.tanh((xw_t + h @ w_hh.T) * scale) * scale + offset
        i, f, g, o = jnp.split(acts, 4, axis=-1)
        c_new = f * c + i * g
        tanh_c = jnp.tanh(c_new)
        h_new = o * tanh_c
        y = _where(valid_t, h_new, jnp.zeros_like(h_new))
        carry_new = (_where(valid_t, h_new, h), _where(valid_t, c_new, c))
        return carry_new, (y, (acts, tanh_c, h, c))

    (h_n, c_n), (ys, saved) = lax.scan(
        step, (h0, c0), _steps(xw, valid), reverse=reverse, unroll=unroll
    )
    return ys, h_n, c_n, saved


@partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def lstm_recurrence(w_hh, xw, h0, c0, valid, reverse=False, unroll=1):
    """``(ys, h_n, c_n)`` of an LSTM direction (no projection); ``xw`` is ``(L, N, 4H)``."""
    ys, h_n, c_n, _ = _lstm_forward(w_hh, xw, h0, c0, valid, reverse, unroll)
    return ys, h_n, c_n


def _lstm_fwd(w_hh, xw, h0, c0, valid, reverse, unroll):
    ys, h_n, c_n, saved = _lstm_forward(w_hh, xw, h0, c0, valid, reverse, unroll)
    return (ys, h_n, c_n), (w_hh, valid, saved)


def _lstm_bwd(reverse, unroll, residuals, cotangents):
    w_hh, valid, (acts, tanh_cs, hs_prev, cs_prev) = residuals
    dys, dh_n, dc_n = cotangents

    def step(carry, inputs):
        dh, dc = carry
        dy, act, tanh_c, c_prev, valid_t = inputs
        i, f, g, o = jnp.split(act, 4, axis=-1)
        dh_total = dh + dy
        dc_total = dc + dh_total * o * (1 - tanh_c * tanh_c)
        d_i = dc_total * g * i * (1 - i)
        d_f = dc_total * c_prev * f * (1 - f)
        d_g = dc_total * i * (1 - g * g)
        d_o = dh_total * tanh_c * o * (1 - o)
        dgates = jnp.concatenate([d_i, d_f, d_g, d_o], axis=-1)
        dh_prev = dgates @ w_hh
        dc_prev = dc_total * f
        if valid_t is None:
            return (dh_prev, dc_prev), dgates
        return (
            (jnp.where(valid_t, dh_prev, dh), jnp.where(valid_t, dc_prev, dc)),
            jnp.where(valid_t, dgates, jnp.zeros_like(dgates)),
        )

    # inputs with valid=None: scan needs arrays, so pass None through a closure-free wrapper
    xs = (dys, acts, tanh_cs, cs_prev, valid)
    if valid is None:

        def body(carry, inputs):
            return step(carry, (*inputs, None))

        xs = xs[:-1]
    else:
        body = step
    (dh0, dc0), dgates = lax.scan(body, (dh_n, dc_n), xs, reverse=not reverse, unroll=unroll)
    # The weight gradient of every step at once: one (4H, L*N) @ (L*N, H) matmul.
    dw_hh = jnp.einsum("tng,tnh->gh", dgates, hs_prev)
    return dw_hh, dgates, dh0, dc0, None


lstm_recurrence.defvjp(_lstm_fwd, _lstm_bwd)


# --------------------------------------------------------------------------------------------
# GRU


def _gru_forward(w_hh, b_hn, xw, h0, valid, reverse, unroll):
    def step(h, inputs):
        xw_t, valid_t = _split(inputs, valid is not None)
        x_rz, x_n = xw_t[..., : 2 * h.shape[-1]], xw_t[..., 2 * h.shape[-1] :]
        hw = h @ w_hh.T
        h_rz, h_n = hw[..., : 2 * h.shape[-1]], hw[..., 2 * h.shape[-1] :] + b_hn[None, :]
        rz = 0.5 * jnp.tanh(0.5 * (x_rz + h_rz)) + 0.5
        r, z = jnp.split(rz, 2, axis=-1)
        n = jnp.tanh(x_n + r * h_n)
        h_new = n + z * (h - n)
        y = _where(valid_t, h_new, jnp.zeros_like(h_new))
        return _where(valid_t, h_new, h), (y, (rz, n, h_n, h))

    h_n, (ys, saved) = lax.scan(step, h0, _steps(xw, valid), reverse=reverse, unroll=unroll)
    return ys, h_n, saved


@partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def gru_recurrence(w_hh, b_hn, xw, h0, valid, reverse=False, unroll=1):
    """``(ys, h_n)`` of a GRU direction; ``xw`` is ``(L, N, 3H)``, ``b_hn`` ``(H,)``."""
    ys, h_n, _ = _gru_forward(w_hh, b_hn, xw, h0, valid, reverse, unroll)
    return ys, h_n


def _gru_fwd(w_hh, b_hn, xw, h0, valid, reverse, unroll):
    ys, h_n, saved = _gru_forward(w_hh, b_hn, xw, h0, valid, reverse, unroll)
    return (ys, h_n), (w_hh, valid, saved)


def _gru_bwd(reverse, unroll, residuals, cotangents):
    w_hh, valid, (rzs, ns, hns, hs_prev) = residuals
    dys, dh_n = cotangents

    def step(dh, inputs):
        dy, rz, n, hn, h_prev, valid_t = inputs
        r, z = jnp.split(rz, 2, axis=-1)
        dh_total = dh + dy
        d_n = dh_total * (1 - z) * (1 - n * n)
        d_r = d_n * hn * r * (1 - r)
        d_z = dh_total * (h_prev - n) * z * (1 - z)
        dxw = jnp.concatenate([d_r, d_z, d_n], axis=-1)
        dhw = jnp.concatenate([d_r, d_z, d_n * r], axis=-1)
        dh_prev = dh_total * z + dhw @ w_hh
        if valid_t is None:
            return dh_prev, (dxw, dhw)
        zero = jnp.zeros_like(dxw)
        return jnp.where(valid_t, dh_prev, dh), (
            jnp.where(valid_t, dxw, zero),
            jnp.where(valid_t, dhw, zero),
        )

    xs = (dys, rzs, ns, hns, hs_prev, valid)
    if valid is None:

        def body(carry, inputs):
            return step(carry, (*inputs, None))

        xs = xs[:-1]
    else:
        body = step
    dh0, (dxw, dhw) = lax.scan(body, dh_n, xs, reverse=not reverse, unroll=unroll)
    hidden = dh0.shape[-1]
    dw_hh = jnp.einsum("tng,tnh->gh", dhw, hs_prev)
    db_hn = jnp.sum(dhw[..., 2 * hidden :], axis=(0, 1))
    return dw_hh, db_hn, dxw, dh0, None


gru_recurrence.defvjp(_gru_fwd, _gru_bwd)
