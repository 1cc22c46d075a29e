"""Layers against their own cells, transformations, dtypes, lengths and long sequences (no torch).

Shapes are shared between tests so that one compiled `run` per kind serves most of them.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jlstm

KINDS = ["lstm", "gru", "rnn_tanh", "rnn_relu"]
L, N, IN, H, LAYERS = 5, 3, 4, 3, 2
TIGHT = dict(rtol=1e-12, atol=1e-12)


def layer(kind: str, params, x, state=None, **kw):
    """(output, h_n, c_n or None) of jlstm.lstm / gru / rnn."""
    if kind == "lstm":
        output, (h_n, c_n) = jlstm.lstm(params, x, state, **kw)
        return output, h_n, c_n
    if kind == "gru":
        return (*jlstm.gru(params, x, state, **kw), None)
    return (*jlstm.rnn(params, x, state, nonlinearity=kind.removeprefix("rnn_"), **kw), None)


@partial(jax.jit, static_argnames=("kind", "batch_first"))
def run(kind, params, x, state, lengths, batch_first=False):
    return layer(kind, params, x, state, seq_lengths=lengths, batch_first=batch_first)


def init(kind: str, key, proj_size=0, dtype=jnp.float64):
    """A 2-layer bidirectional layer with input IN and hidden H."""
    kw = dict(bidirectional=True, dtype=dtype)
    if kind.startswith("rnn"):
        return jlstm.init_rnn(key, IN, H, LAYERS, nonlinearity=kind.removeprefix("rnn_"), **kw)
    if kind == "gru":
        return jlstm.init_gru(key, IN, H, LAYERS, **kw)
    return jlstm.init_lstm(key, IN, H, LAYERS, proj_size=proj_size, **kw)


def setup(kind: str, proj_size=0):
    """(params, x (L, N, IN), state) in float64."""
    params = init(kind, jax.random.key(0), proj_size)
    kx, kh, kc = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(kx, (L, N, IN), jnp.float64)
    h0 = jax.random.normal(kh, (2 * LAYERS, N, proj_size or H), jnp.float64)
    state = (h0, jax.random.normal(kc, (2 * LAYERS, N, H), jnp.float64)) if kind == "lstm" else h0
    return params, x, state


def cell(kind: str, params, x, state):
    if kind == "lstm":
        return jlstm.lstm_cell(params, x, state)
    if kind == "gru":
        return jlstm.gru_cell(params, x, state)
    return jlstm.rnn_cell(params, x, state, nonlinearity=kind.removeprefix("rnn_"))


@partial(jax.jit, static_argnames="kind")
def python_loop(kind, params, x, state):
    """The layer written as a Python loop over the public cell, per layer, direction and step."""
    inputs, finals = x, []
    for k in range(LAYERS):
        outputs = []
        for d, sfx in enumerate(("", "_reverse")):
            names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
            cell_params = {name: params[f"{name}_l{k}{sfx}"] for name in names}
            s = jax.tree.map(lambda a, row=2 * k + d: a[row], state)
            ys = [None] * L
            for t in reversed(range(L)) if d else range(L):
                s = cell(kind, cell_params, inputs[t], s)
                ys[t] = s[0] if kind == "lstm" else s
            outputs.append(jnp.stack(ys))
            finals.append(s)
        inputs = jnp.concatenate(outputs, axis=-1)
    if kind == "lstm":
        return inputs, jnp.stack([h for h, _ in finals]), jnp.stack([c for _, c in finals])
    return inputs, jnp.stack(finals), None


@pytest.mark.parametrize("kind", KINDS)
def test_scan_equals_python_loop_over_cell(kind):
    params, x, state = setup(kind)
    got = run(kind, params, x, state, None)
    want = python_loop(kind, params, x, state)
    for g, w, name in zip(got, want, ("output", "h_n", "c_n"), strict=True):
        if w is not None:
            np.testing.assert_allclose(g, w, **TIGHT, err_msg=name)


@pytest.mark.parametrize("kind", KINDS)
def test_grad_matches_finite_differences(kind):
    """jax.grad (under jit) through lengths, two layers, both directions and the initial state."""
    params, x, state = setup(kind)
    lengths = jnp.array([5, 1, 3])

    @jax.jit
    def loss(params, x, state):
        output, h_n, c_n = layer(kind, params, x, state, seq_lengths=lengths)
        extra = 0.0 if c_n is None else jnp.sum(jnp.sin(c_n))
        return jnp.sum(jnp.sin(output)) + jnp.sum(jnp.cos(h_n)) + extra

    check_grads(loss, (params, x, state), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_vmap_over_unbatched_sequences_equals_batch(kind):
    params, x, state = setup(kind)
    batched = run(kind, params, x, state, None)
    states = jax.tree.map(lambda s: jnp.swapaxes(s, 0, 1), state)  # (N, D*layers, H) each
    mapped = jax.jit(jax.vmap(partial(layer, kind, params), in_axes=(1, 0)))(x, states)
    np.testing.assert_allclose(mapped[0], jnp.swapaxes(batched[0], 0, 1), **TIGHT)
    for got, want in zip(mapped[1:], batched[1:], strict=True):
        if want is not None:  # states: vmap puts N first, the layer second
            np.testing.assert_allclose(jnp.swapaxes(got, 0, 1), want, **TIGHT)


@pytest.mark.parametrize("kind", KINDS)
def test_vmap_over_params_equals_each_model(kind):
    _, x, state = setup(kind)
    lengths = jnp.array([5, 2, 4])
    models = [init(kind, jax.random.key(seed)) for seed in (7, 8, 9)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *models)
    mapped = jax.jit(jax.vmap(lambda p: layer(kind, p, x, state, seq_lengths=lengths)))(stacked)
    for m, params in enumerate(models):
        alone = run(kind, params, x, state, lengths)
        for got, want in zip(mapped, alone, strict=True):
            if want is not None:
                np.testing.assert_allclose(got[m], want, **TIGHT)


@pytest.mark.parametrize("kind", KINDS)
def test_dtypes_are_kept_and_bfloat16_is_close_to_float32(kind):
    params, x, state = setup(kind)
    lengths = jnp.array([5, 3, 1])
    results = {}
    for dtype in (jnp.float64, jnp.float32, jnp.bfloat16):
        cast = partial(jax.tree.map, lambda a, dtype=dtype: a.astype(dtype))
        results[dtype] = run(kind, cast(params), cast(x), cast(state), lengths)
        for out in results[dtype]:
            if out is not None:
                assert out.dtype == dtype, (dtype, out.dtype)
                assert jnp.all(jnp.isfinite(out))
    for f64, f32, bf16 in zip(*results.values(), strict=True):
        if f64 is not None:
            np.testing.assert_allclose(f32, f64, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(bf16.astype(jnp.float64), f64, rtol=0, atol=6e-2)


@pytest.mark.parametrize("kind", KINDS)
def test_zero_length_gives_zero_output_and_initial_state(kind):
    params, x, state = setup(kind)
    output, h_n, c_n = run(kind, params, x, state, jnp.array([0, 5, 0]))
    np.testing.assert_array_equal(output[:, 0], 0.0)
    np.testing.assert_array_equal(output[:, 2], 0.0)
    assert jnp.any(output[:, 1] != 0.0)
    h0 = state[0] if kind == "lstm" else state
    np.testing.assert_array_equal(h_n[:, ::2], h0[:, ::2])
    assert not np.allclose(h_n[:, 1], h0[:, 1])
    if kind == "lstm":
        np.testing.assert_array_equal(c_n[:, ::2], state[1][:, ::2])


@pytest.mark.parametrize("kind", KINDS + ["lstm_proj"])
def test_variable_lengths_equal_each_sequence_alone(kind):
    proj_size = 2 if kind == "lstm_proj" else 0
    kind = kind.removesuffix("_proj")
    params, x, state = setup(kind, proj_size)
    lengths = (5, 1, 3)
    padded = jnp.where(jnp.arange(L)[:, None, None] < jnp.array(lengths)[None, :, None], x, 7.0)
    output, h_n, c_n = run(kind, params, padded, state, jnp.array(lengths))
    for i, n in enumerate(lengths):
        alone_state = jax.tree.map(lambda s, i=i: s[:, i], state)
        out_i, h_i, c_i = run(kind, params, x[:n, i], alone_state, None)  # unbatched
        np.testing.assert_allclose(output[:n, i], out_i, **TIGHT)
        np.testing.assert_array_equal(output[n:, i], 0.0)
        np.testing.assert_allclose(h_n[:, i], h_i, **TIGHT)
        if kind == "lstm":
            np.testing.assert_allclose(c_n[:, i], c_i, **TIGHT)


@pytest.mark.parametrize("kind", KINDS)
def test_long_sequence_stays_finite(kind):
    params = {k: v.astype(jnp.float32) for k, v in init(kind, jax.random.key(0)).items()}
    if kind == "rnn_relu":  # keep the ReLU recurrence contracting: explosion would be legitimate
        params = {k: 0.5 * v if k.startswith("weight_hh") else v for k, v in params.items()}
    x = 10.0 * jax.random.normal(jax.random.key(1), (5000, 2, IN), jnp.float32)  # saturates gates

    @jax.jit
    def loss(params, x):
        output, h_n, _ = layer(kind, params, x)
        return jnp.mean(output**2) + jnp.mean(h_n), output

    (value, output), grads = jax.value_and_grad(loss, has_aux=True)(params, x)
    assert output.dtype == jnp.float32
    assert jnp.all(jnp.isfinite(output)) and jnp.isfinite(value)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert jnp.std(output[-100:]) > 0  # still responding to its input at the end
