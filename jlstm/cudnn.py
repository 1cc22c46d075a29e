"""An LSTM stack on cuDNN through ``jax.experimental.rnn``, from torch-layout parameters.

``jax.experimental.rnn.lstm`` calls cuDNN's fused RNN (forward and backward) on a CUDA GPU. It
takes torch's gate order and equations, its weights as one flat vector (every direction's
``W_ih`` and ``W_hh``, then every direction's ``b_ih`` and ``b_hh``) and batch-major input.
:func:`layer` runs one layer, both directions at once, so that jlstm's own dropout (torch's, between
layers) still applies; packed sequences map onto cuDNN's padded layout with lengths.

It is float32 only, has no lowering but CUDA's (none for CPU, so its plumbing is tested against
``jax.experimental.rnn.lstm_ref``), and asks cuDNN for IEEE float32 matmuls, not TF32, so it
computes what the other paths compute.

``jax.experimental.rnn.lstm`` is a ``jax.custom_vjp`` around the cuDNN calls, which JAX can
neither push tangents through nor differentiate twice. :func:`layer` therefore runs it through
:func:`jlstm.loops.loop_with_backward`, like the other fast loops: a training step runs cuDNN's
forward (keeping its residuals) and cuDNN's backward once each, while forward mode (``jvp``,
``jacfwd``, ``hessian``) and higher orders differentiate ``jax.experimental.rnn.lstm_ref``, what
the cuDNN call computes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import rnn

from jlstm import loops
from jlstm import params as P


def pack(directions: tuple[P.Weights, ...]) -> jax.Array:
    """One layer's weights as cuDNN's flat vector; absent biases (``bias=False``) are zeros."""
    mats = [a.ravel() for w in directions for a in (w.w_ih, w.w_hh)]
    zeros = jnp.zeros(directions[0].w_hh.shape[:1], directions[0].w_hh.dtype)
    biases = [zeros if b is None else b for w in directions for b in (w.b_ih, w.b_hh)]
    return jnp.concatenate(mats + biases)


def _static(x, h0) -> tuple:
    """``jax.experimental.rnn``'s static arguments for one layer, read from the shapes: input and
    hidden size, one layer, no dropout, bidirectional, IEEE float32 (not TF32)."""
    return x.shape[-1], h0.shape[-1], 1, 0.0, h0.shape[0] == 2, lax.Precision.HIGHEST


def _forward(weights, x, h0, c0, lengths, reverse, save):
    """cuDNN's forward; with ``save``, also what cuDNN's backward reads (its output and reserve
    space; the inputs are kept by :func:`jlstm.loops.loop_with_backward`)."""
    del reverse  # both directions are in the call
    out, residuals = rnn.lstm_fwd(x, h0, c0, weights, lengths, *_static(x, h0))
    return out, (residuals[-2:] if save else ())


def _backward(reverse, residuals, cotangents, needed):
    del needed  # cuDNN's backward forms every gradient
    weights, x, h0, c0, lengths, (y, reserve) = residuals
    cudnn_residuals = (x, h0, c0, weights, lengths, y, reserve)
    dx, dh0, dc0, dw, _ = rnn.lstm_bwd(*_static(x, h0), cudnn_residuals, cotangents)
    return dw, dx, dh0, dc0, None


def _reference(weights, x, h0, c0, valid, reverse):
    """What the cuDNN call computes, in plain JAX (``valid`` holds the lengths, or None)."""
    del reverse
    lengths = jnp.full(x.shape[:1], x.shape[1], jnp.int32) if valid is None else valid
    input_size, hidden_size, layers, dropout, bidirectional, _ = _static(x, h0)
    unpacked = rnn.unpack_lstm_weights(weights, input_size, hidden_size, layers, bidirectional)
    return rnn.lstm_ref(
        x, h0, c0, *unpacked, lengths, input_size, hidden_size, layers, dropout, bidirectional
    )


_lstm = loops.loop_with_backward(
    _forward,
    _backward,
    _reference,
    """``(y, h_n, c_n)`` of ``jax.experimental.rnn.lstm`` for one layer: ``(weights, x (N, L, I),
    h0, c0 (D, N, H), lengths (N,), reverse)``, differentiable in every way.""",
    num_arrays=4,
)


def layer(
    directions: tuple[P.Weights, ...],
    x: jax.Array,
    h0: jax.Array,
    c0: jax.Array,
    lengths: jax.Array | None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(y, h_n, c_n)`` of one (bi)directional LSTM layer: ``x (L, N, I)`` time-major, states
    ``(D, N, H)``, ``lengths (N,)`` (each at least 1: cuDNN has no empty sequences) or None."""
    length, batch = x.shape[:2]
    lengths = jnp.full((batch,), length, jnp.int32) if lengths is None else lengths
    y, h_n, c_n = _lstm(
        pack(directions), jnp.swapaxes(x, 0, 1), h0, c0, lengths.astype(jnp.int32), False
    )
    return jnp.swapaxes(y, 0, 1), h_n, c_n
