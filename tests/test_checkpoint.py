"""``checkpoint_every``: the segment-wise recomputed backward gives the same outputs, states and
gradients as the default on every path, and really bounds the memory of a training step."""

import jax
import jax.numpy as jnp
import pytest
from trees import assert_trees_close, probe_loss

import jlstm

KEY = jax.random.key(3)
LENGTH, BATCH, INPUT, HIDDEN = 11, 4, 3, 5
LENGTHS = jnp.array([11, 3, 0, 7])
FNS = {
    "lstm": (jlstm.lstm, jlstm.init_lstm),
    "gru": (jlstm.gru, jlstm.init_gru),
    "rnn": (jlstm.rnn, jlstm.init_rnn),
}


def _value_and_grads(fn, params, x, state, every, **kw):
    def loss(params, x, state):
        return probe_loss(*fn(params, x, state, checkpoint_every=every, **kw))

    return jax.value_and_grad(loss, argnums=(0, 1, 2))(params, x, state)


# every=4 leaves a ragged last segment of 3 steps (LENGTH=11); every=1 and every >= L are the edges.
@pytest.mark.parametrize("every", [1, 4, 11, 50])
@pytest.mark.parametrize("lengths", [False, True], ids=["dense", "lengths"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize(
    "kind,impl", [("lstm", "auto"), ("lstm", "scan"), ("gru", "auto"), ("rnn", "auto")]
)
def test_checkpoint_every_matches_default(kind, impl, bidirectional, lengths, every):
    fn, init = FNS[kind]
    params = init(KEY, INPUT, HIDDEN, num_layers=2, bidirectional=bidirectional, dtype=jnp.float64)
    x = jax.random.normal(jax.random.key(1), (LENGTH, BATCH, INPUT), jnp.float64)
    rows = 2 * (2 if bidirectional else 1)
    h0 = jax.random.normal(jax.random.key(2), (rows, BATCH, HIDDEN), jnp.float64)
    state = (h0, -h0) if kind == "lstm" else h0
    kw = {"impl": impl, "seq_lengths": LENGTHS if lengths else None}
    got = _value_and_grads(fn, params, x, state, every, **kw)
    want = _value_and_grads(fn, params, x, state, None, **kw)
    assert_trees_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_checkpoint_every_bounds_train_step_memory(kind):
    """XLA's buffers for a 2048-step training step: the default keeps every step's activations;
    checkpoint_every=32 keeps one state per segment plus one segment's activations. Both also hold
    the sequence-long buffers no schedule avoids, the output, its cotangent and dx; the activations
    on top of those must shrink more than 8x."""
    fn, init = FNS[kind]
    length, batch, hidden = 2048, 8, 32
    params = init(KEY, 4, hidden)
    x = jnp.ones((length, batch, 4))

    def temp_mib(every):
        step = jax.jit(jax.grad(lambda p, x: jnp.sum(fn(p, x, checkpoint_every=every)[0])))
        return step.lower(params, x).compile().memory_analysis().temp_size_in_bytes / 2**20

    full, bounded = temp_mib(None), temp_mib(32)
    gates = length * batch * (4 if kind == "lstm" else 3) * hidden * 4 / 2**20
    assert full > gates  # at least one (L, N, G*H) float32 buffer of saved gate activations
    sequence = length * batch * (2 * hidden + 4) * 4 / 2**20  # output, its cotangent, dx
    assert bounded - sequence < (full - sequence) / 8, (full, bounded, sequence)
