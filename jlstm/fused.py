"""The fused loop: one LSTM or GRU direction as ``lax.scan`` with a hand-written backward pass.

Autodiff through ``lax.scan`` accumulates the weight gradients step by step inside the backward
loop: small ``(G*H, N) @ (N, ·)`` matmuls plus carried accumulators. cuDNN and oneDNN instead keep
every step's gate gradients and form ``dW_hh``, ``dW_ih``, ``db`` and ``dx`` as single large matmuls
after the loop; this module does the same. The forward saves what the backward needs (gate
activations, ``tanh(c)``, previous states), so the backward loop holds only elementwise work and
``dgates @ W_hh``; it has no transcendental functions at all.

``hoist`` chooses where the input projection ``x_t @ W_ih.T`` happens in the forward: as one large
matmul before the loop (fast on GPU/TPU), or inside each step next to ``h @ W_hh.T`` (faster on XLA
CPU, where a step's fusion reading a slice of a large precomputed buffer runs slower than the small
extra matmul). ``valid`` (``(L, N, 1)`` bool or None) gives packed-sequence semantics exactly as
:func:`jlstm.loops.lstm_reference`: invalid steps keep the carry and output zeros.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jlstm import loops


def _where(valid, new, old):
    return new if valid is None else jnp.where(valid, new, old)


def _scan_inputs(x, w_ih_t, bias, valid, hoist):
    """What the forward scan runs over: the projected inputs (hoisted) or the raw inputs."""
    xs = x @ w_ih_t + bias[None, None, :] if hoist else x
    return xs if valid is None else (xs, valid)


def _step_input(inputs, w_ih_t, bias, masked, hoist):
    xs_t, valid_t = inputs if masked else (inputs, None)
    return (xs_t if hoist else xs_t @ w_ih_t + bias[None, :]), valid_t


def _backward_scan(step, carry, xs, valid, reverse, unroll):
    """Runs ``step(carry, (*xs, valid_t))`` backwards in time, passing ``valid_t=None`` unmasked."""
    if valid is None:
        return lax.scan(
            lambda c, i: step(c, (*i, None)), carry, xs, reverse=not reverse, unroll=unroll
        )
    return lax.scan(step, carry, (*xs, valid), reverse=not reverse, unroll=unroll)


# --------------------------------------------------------------------------------------------
# LSTM


def _gate_scales(hidden: int, dtype) -> tuple[jax.Array, jax.Array]:
    """Per-column (scale, offset), each ``(1, 4H)``, so that one tanh over the whole i,f,g,o block
    gives every gate: sigmoid(x) = 0.5 * tanh(0.5 x) + 0.5 for i, f, o and tanh(x) for g."""
    half, one, zero = (jnp.full((hidden,), v, dtype) for v in (0.5, 1.0, 0.0))
    return (
        jnp.concatenate([half, half, one, half])[None, :],
        jnp.concatenate([half, half, zero, half])[None, :],
    )


def _lstm_forward(w_ih, w_hh, bias, x, h0, c0, valid, reverse, unroll, hoist, save=True):
    del save  # what is not needed XLA drops
    scale, offset = _gate_scales(c0.shape[-1], x.dtype)
    # (in, 4H) layouts, made once: XLA CPU's small dots run about twice as fast on them.
    w_ih_t, w_hh_t = w_ih.T, w_hh.T

    def step(carry, inputs):
        h, c = carry
        xw_t, valid_t = _step_input(inputs, w_ih_t, bias, valid is not None, hoist)
        t = jnp.tanh((xw_t + h @ w_hh_t) * scale)
        i, f, g, o = jnp.split(t * scale + offset, 4, axis=-1)
        c_new = f * c + i * g
        tanh_c = jnp.tanh(c_new)
        h_new = o * tanh_c
        y = _where(valid_t, h_new, jnp.zeros_like(h_new))
        carry_new = (_where(valid_t, h_new, h), _where(valid_t, c_new, c))
        # What the backward needs, already multiplied out: d(gates)/d(pre-activations) is
        # (1 - t^2) * scale^2 over the whole block (s(1-s) = (1 - t^2)/4 for the sigmoids), times
        # dc * [g, c_prev, i, .] and dh * [., ., ., tanh_c]; A = o (1 - tanh_c^2) carries dh into dc.
        factors = (1 - t * t) * (scale * scale) * jnp.concatenate([g, c, i, tanh_c], axis=-1)
        return carry_new, (y, (factors, o * (1 - tanh_c * tanh_c), f, h))

    xs = _scan_inputs(x, w_ih_t, bias, valid, hoist)
    (h_n, c_n), (ys, saved) = lax.scan(step, (h0, c0), xs, reverse=reverse, unroll=unroll)
    return (ys, h_n, c_n), saved


def _lstm_bwd(reverse, unroll, hoist, residuals, cotangents, needed):
    del needed  # what is not needed is XLA's to drop (dead code)
    w_ih, w_hh, _, x, _, _, valid, (factors, dh_to_dc, forget, hs_prev) = residuals
    dys, dh_n, dc_n = cotangents

    def step(carry, inputs):
        dh, dc = carry
        dy, factor, a, f, valid_t = inputs
        dh_total = dh + dy
        dc_total = dc + dh_total * a
        dgates = factor * jnp.concatenate([dc_total, dc_total, dc_total, dh_total], axis=-1)
        dh_prev, dc_prev = dgates @ w_hh, dc_total * f
        if valid_t is None:
            return (dh_prev, dc_prev), dgates
        return (
            (jnp.where(valid_t, dh_prev, dh), jnp.where(valid_t, dc_prev, dc)),
            jnp.where(valid_t, dgates, jnp.zeros_like(dgates)),
        )

    (dh0, dc0), dgates = _backward_scan(
        step, (dh_n, dc_n), (dys, factors, dh_to_dc, forget), valid, reverse, unroll
    )
    dw_ih, dbias, dx = loops.input_grads(dgates, x, w_ih)
    return dw_ih, loops.weight_grad(dgates, hs_prev), dbias, dx, dh0, dc0, None


_lstm_loop = loops.loop_with_backward(
    _lstm_forward, _lstm_bwd, loops.lstm_reference, "One LSTM direction (fused)."
)


def lstm_recurrence(w_ih, w_hh, bias, x, h0, c0, valid, reverse=False, unroll=1, hoist=True):
    """``(ys, h_n, c_n)`` of one LSTM direction without projection.

    Args: ``w_ih (4H, I)``, ``w_hh (4H, H)``, ``bias (4H,)`` (``b_ih + b_hh``), ``x (L, N, I)``,
    ``h0, c0 (N, H)``, ``valid (L, N, 1)`` or None; ``reverse``, ``unroll``, ``hoist`` are static.

    >>> import jax.numpy as jnp
    >>> w, s = jnp.zeros((8, 2)), jnp.zeros((1, 2))
    >>> lstm_recurrence(w, w, jnp.zeros(8), jnp.ones((3, 1, 2)), s, s, None)[0].shape
    (3, 1, 2)
    """
    return _lstm_loop(w_ih, w_hh, bias, x, h0, c0, valid, reverse, unroll, hoist)


# --------------------------------------------------------------------------------------------
# GRU


def _gru_forward(w_ih, w_hh, bias, b_hn, x, h0, valid, reverse, unroll, hoist, save=True):
    del save  # what is not needed XLA drops
    hidden = h0.shape[-1]
    w_ih_t, w_hh_t = w_ih.T, w_hh.T  # (in, 3H) layouts, made once (see _lstm_forward)

    def step(h, inputs):
        xw_t, valid_t = _step_input(inputs, w_ih_t, bias, valid is not None, hoist)
        hw = h @ w_hh_t
        h_n = hw[..., 2 * hidden :] + b_hn[None, :]
        rz = 0.5 * jnp.tanh(0.5 * (xw_t[..., : 2 * hidden] + hw[..., : 2 * hidden])) + 0.5
        r, z = jnp.split(rz, 2, axis=-1)
        n = jnp.tanh(xw_t[..., 2 * hidden :] + r * h_n)
        h_new = n + z * (h - n)
        y = _where(valid_t, h_new, jnp.zeros_like(h_new))
        return _where(valid_t, h_new, h), (y, (rz, n, h_n, h))

    xs = _scan_inputs(x, w_ih_t, bias, valid, hoist)
    h_n, (ys, saved) = lax.scan(step, h0, xs, reverse=reverse, unroll=unroll)
    return (ys, h_n), saved


def _gru_bwd(reverse, unroll, hoist, residuals, cotangents, needed):
    del needed  # what is not needed is XLA's to drop (dead code)
    w_ih, w_hh, _, _, x, _, valid, (rzs, ns, hns, hs_prev) = residuals
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

    dh0, (dxw, dhw) = _backward_scan(
        step, dh_n, (dys, rzs, ns, hns, hs_prev), valid, reverse, unroll
    )
    dw_ih, dbias, dx = loops.input_grads(dxw, x, w_ih)
    dw_hh = loops.weight_grad(dhw, hs_prev)
    db_hn = jnp.sum(dhw[..., 2 * dh0.shape[-1] :], axis=(0, 1))
    return dw_ih, dw_hh, dbias, db_hn, dx, dh0, None


_gru_loop = loops.loop_with_backward(
    _gru_forward, _gru_bwd, loops.gru_reference, "One GRU direction (fused)."
)


def gru_recurrence(w_ih, w_hh, bias, b_hn, x, h0, valid, reverse=False, unroll=1, hoist=True):
    """``(ys, h_n)`` of one GRU direction: ``w_ih (3H, I)``, ``w_hh (3H, H)``, ``bias (3H,)``
    (``b_ih + [b_hr, b_hz, 0]``), ``b_hn (H,)``, ``x (L, N, I)``, ``h0 (N, H)``; as LSTM otherwise.

    >>> import jax.numpy as jnp
    >>> w = jnp.zeros((6, 2))
    >>> gru_recurrence(w, w, jnp.zeros(6), jnp.zeros(2), jnp.ones((3, 1, 2)), jnp.ones((1, 2)), None)[1]
    Array([[0.125, 0.125]], dtype=float32)
    """
    return _gru_loop(w_ih, w_hh, bias, b_hn, x, h0, valid, reverse, unroll, hoist)
