"""Strict test settings: implicit rank promotion raises, float64 is available everywhere.

x64 is on so that float64 parity with torch is possible; tests that mean float32 pass the dtype
explicitly (and check that it is kept).
"""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_enable_x64", True)


@pytest.fixture
def torch():
    """The torch module, single-threaded; skips the test where torch is not installed."""
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    return torch


@pytest.fixture
def cudnn_on_cpu(monkeypatch):
    """impl="cudnn" on this CPU: jax.experimental.rnn's reference LSTM (``lstm_ref``, what its
    cuDNN call computes) stands in for cuDNN's forward and backward (``rnn.lstm_fwd``/``lstm_bwd``,
    what jlstm.cudnn calls), which lower only for CUDA. What is tested is
    jlstm's side: the flat weight vector, the batch-major layout, states, lengths, dropout between
    layers and the gradients back to torch-named parameters."""
    from jax.experimental import rnn

    from jlstm import backends

    def reference(x, h0, c0, weights, seq_lengths, *, precision, **sizes):
        assert precision == jax.lax.Precision.HIGHEST  # IEEE float32, not TF32
        names = ("input_size", "hidden_size", "num_layers", "bidirectional")
        unpacked = rnn.unpack_lstm_weights(weights, *(sizes[k] for k in names))
        static = [sizes[k] for k in ("input_size", "hidden_size", "num_layers", "dropout")]
        return rnn.lstm_ref(x, h0, c0, *unpacked, seq_lengths, *static, sizes["bidirectional"])

    names = ("input_size", "hidden_size", "num_layers", "dropout", "bidirectional", "precision")

    def forward(x, h0, c0, weights, seq_lengths, *static):
        out = reference(x, h0, c0, weights, seq_lengths, **dict(zip(names, static, strict=True)))
        return out, (x, h0, c0, weights, seq_lengths, out[0], jnp.zeros((0,), jnp.float32))

    def backward(*static_residuals_gradients):
        *static, (x, h0, c0, weights, seq_lengths, _, _), gradients = static_residuals_gradients
        sizes = dict(zip(names, static, strict=True))
        run = lambda *a: reference(*a, seq_lengths, **sizes)  # noqa: E731
        return (*jax.vjp(run, x, h0, c0, weights)[1](gradients), jnp.zeros_like(seq_lengths))

    monkeypatch.setattr(rnn, "lstm_fwd", forward)
    monkeypatch.setattr(rnn, "lstm_bwd", backward)
    # Lowers on CPU and in float64 too, the reference standing in for cuDNN.
    entry = backends.BACKENDS["cudnn"]
    widened = dataclasses.replace(
        entry, dtypes=None, platforms=(*entry.platforms, "cpu"), process=lambda: None
    )
    monkeypatch.setitem(backends.BACKENDS, "cudnn", widened)
    jax.clear_caches()  # the layer stack is jitted: retrace with the stand-in
    yield
    jax.clear_caches()
