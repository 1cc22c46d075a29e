# ruff: noqa: E741, B023  (B, T, I, H as in the issue; loop closures run within their iteration)
"""Integrated prototype of one LSTM direction for XLA CPU: the measured proposals together.

  1. the step's matmuls use weights transposed once before the loop ((in, 4H) layout)
  2. the forward saves the derivative factors P = [g i(1-i), c_prev f(1-f), i(1-g^2), tanh_c o(1-o)],
     A = o (1 - tanh_c^2) and f, so a backward step is dc += (dh+dy) A; dgates = P * [dc,dc,dc,dh+dy]
  3. the backward runs over chunks of C steps (outer scan) and, after each chunk, forms that chunk's
     weight gradients as h_c^T @ d_c and x_c^T @ d_c (K = C*N rows, cache-resident) and dx_c; no
     (T, N, 4H) gate-gradient buffer exists

Unmasked, forward direction only; exact (float32 rounding) against torch.
"""

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax


def _scales(H, dtype):
    half, one, zero = (jnp.full((H,), v, dtype) for v in (0.5, 1.0, 0.0))
    return jnp.concatenate([half, half, one, half]), jnp.concatenate([half, half, zero, half])


def chunk_steps(T, N, rows=512):
    """Largest divisor of T not above max(1, rows // N): a chunk's GEMMs have about `rows` rows."""
    c = max(1, min(T, rows // N))
    while T % c:
        c -= 1
    return c


def _forward(w_ih, w_hh, bias, x, h0, c0, factors):
    H = h0.shape[-1]
    scale, offset = _scales(H, x.dtype)
    w_ih_t, w_hh_t = w_ih.T, w_hh.T

    def step(carry, x_t):
        h, c = carry
        acts = jnp.tanh((x_t @ w_ih_t + h @ w_hh_t + bias) * scale) * scale + offset
        i, f, g, o = jnp.split(acts, 4, axis=-1)
        c_new = f * c + i * g
        tanh_c = jnp.tanh(c_new)
        h_new = o * tanh_c
        if factors:
            p = jnp.concatenate(
                [g * i * (1 - i), c * f * (1 - f), i * (1 - g * g), tanh_c * o * (1 - o)], -1
            )
            saved = (p, o * (1 - tanh_c * tanh_c), f, h)
        else:
            saved = None
        return (h_new, c_new), (h_new, saved)

    (h_n, c_n), (ys, saved) = lax.scan(step, (h0, c0), x)
    return (ys, h_n, c_n), saved


@partial(jax.custom_vjp, nondiff_argnums=(6,))
def lstm_layer(w_ih, w_hh, bias, x, h0, c0, rows=512):
    return _forward(w_ih, w_hh, bias, x, h0, c0, factors=False)[0]


def _fwd(w_ih, w_hh, bias, x, h0, c0, rows):
    out, saved = _forward(w_ih, w_hh, bias, x, h0, c0, factors=True)
    return out, (w_ih, w_hh, x, saved)


def _bwd(rows, res, cts):
    w_ih, w_hh, x, (P, A, F, hs) = res
    dys, dh_n, dc_n = cts
    T, N, G = P.shape
    H, I = G // 4, x.shape[-1]
    C = chunk_steps(T, N, rows)

    def chunks(a):
        return a.reshape(T // C, C, *a.shape[1:])

    def step(carry, inputs):
        dh, dc = carry
        dy, p, a, f = inputs
        dh_total = dh + dy
        dc_total = dc + dh_total * a
        dgates = p * jnp.concatenate([dc_total, dc_total, dc_total, dh_total], axis=-1)
        return (dgates @ w_hh, dc_total * f), dgates

    def chunk(carry, inputs):
        dh, dc, acc_hh, acc_ih, acc_b = carry
        dy, p, a, f, h_c, x_c = inputs
        (dh, dc), d = lax.scan(step, (dh, dc), (dy, p, a, f), reverse=True)
        d = d.reshape(C * N, G)
        acc_hh = acc_hh + h_c.reshape(C * N, H).T @ d
        acc_ih = acc_ih + x_c.reshape(C * N, I).T @ d
        return (dh, dc, acc_hh, acc_ih, acc_b + d.sum(0)), (d @ w_ih).reshape(C, N, I)

    zeros = (jnp.zeros((H, G), x.dtype), jnp.zeros((I, G), x.dtype), jnp.zeros((G,), x.dtype))
    (dh0, dc0, acc_hh, acc_ih, db), dx = lax.scan(
        chunk, (dh_n, dc_n, *zeros), tuple(map(chunks, (dys, P, A, F, hs, x))), reverse=True
    )
    return acc_ih.T, acc_hh.T, db, dx.reshape(T, N, I), dh0, dc0


lstm_layer.defvjp(_fwd, _bwd)


def lstm(params, x, rows=512):
    """Single-layer unidirectional torch-named params -> (output, (h_n, c_n)), time-major."""
    w_ih, w_hh = params["weight_ih_l0"], params["weight_hh_l0"]
    bias = params["bias_ih_l0"] + params["bias_hh_l0"]
    z = jnp.zeros((x.shape[1], w_hh.shape[1]), x.dtype)
    ys, h, c = lstm_layer(w_ih, w_hh, bias, x, z, z, rows)
    return ys, (h, c)
