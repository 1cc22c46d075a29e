"""An LSTM stack on cuDNN through ``jax.experimental.rnn``, from torch-layout parameters.

``jax.experimental.rnn.lstm`` calls cuDNN's fused RNN (forward and backward) on a CUDA GPU. It
takes torch's gate order and equations, its weights as one flat vector (every direction's
``W_ih`` and ``W_hh``, then every direction's ``b_ih`` and ``b_hh``) and batch-major input.
:func:`layer` runs one layer, both directions at once, so that jlstm's own dropout (torch's, between
layers) still applies; packed sequences map onto cuDNN's padded layout with lengths.

It is float32 only, has no lowering but CUDA's (none for CPU, so its plumbing is tested against
``jax.experimental.rnn.lstm_ref``), and asks cuDNN for IEEE float32 matmuls, not TF32, so it
computes what the other paths compute.

``jax.experimental.rnn.lstm`` is a ``jax.custom_vjp`` around the cuDNN calls: ``jit``, ``grad``,
``vmap`` and ``checkpoint`` work, forward mode (``jvp``, ``jacfwd``, ``hessian``) and ``grad`` of
``grad`` do not (JAX raises); every other ``impl`` supports those (:mod:`jlstm.backends`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import rnn

from jlstm import params as P


def unavailable_reason(backend: str, dtype, checkpoint_every) -> str | None:
    """Why :func:`layer` cannot run this call, or None."""
    if backend != "gpu":
        return f"cuDNN runs on CUDA GPUs; jax.experimental.rnn has no lowering for {backend}"
    if jnp.dtype(dtype) != jnp.float32:
        return f"jax.experimental.rnn runs float32 only, not {jnp.dtype(dtype).name}"
    if checkpoint_every is not None:
        return "cuDNN keeps its own activations, so checkpoint_every cannot segment them"
    return None


def pack(directions: tuple[P.Weights, ...]) -> jax.Array:
    """One layer's weights as cuDNN's flat vector; absent biases (``bias=False``) are zeros."""
    mats = [a.ravel() for w in directions for a in (w.w_ih, w.w_hh)]
    zeros = jnp.zeros(directions[0].w_hh.shape[:1], directions[0].w_hh.dtype)
    biases = [zeros if b is None else b for w in directions for b in (w.b_ih, w.b_hh)]
    return jnp.concatenate(mats + biases)


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
    y, h_n, c_n = rnn.lstm(
        jnp.swapaxes(x, 0, 1),
        h0,
        c0,
        pack(directions),
        lengths.astype(jnp.int32),
        input_size=x.shape[-1],
        hidden_size=h0.shape[-1],
        num_layers=1,
        dropout=0.0,
        bidirectional=len(directions) == 2,
        precision=lax.Precision.HIGHEST,
    )
    return jnp.swapaxes(y, 0, 1), h_n, c_n
