"""Problems and checks shared by the tests of jlstm's time loops (test_native, test_gpu_paths):
a random layer, input and state of a given size, its loss and gradients on one ``impl``, and the
comparison of an ``impl`` with the ``lax.scan`` path."""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from trees import assert_trees_close, probe_loss

import jlstm

LAYERS = {"lstm": (jlstm.lstm, jlstm.init_lstm), "gru": (jlstm.gru, jlstm.init_gru)}


def _value_and_grads(kind, params, x, state, impl, argnums=(0, 1, 2), **kw):
    def loss(params, x, state):
        return probe_loss(*LAYERS[kind][0](params, x, state, impl=impl, **kw))

    return jax.jit(jax.value_and_grad(loss, argnums=argnums))(params, x, state)


# What a check computes from its problem alone, kept for the rest of this process: test_native
# checks each problem under four backward forms, each after a jax.clear_caches (its backward
# fixture), and on its weights' gradients alone. Drawing a problem again then compiles its random
# draws again (about 4 s), and the lax.scan path's results cost 3-5 times the path under test; no
# jlstm.native setting reaches either, so each is computed once.
_KEPT: dict[tuple, object] = {}


def _kept(key: tuple, compute: Callable[[], object]) -> object:
    key = (*key, jax.config.jax_enable_x64)
    if key not in _KEPT:
        _KEPT[key] = compute()
    return _KEPT[key]


def _problem(kind, length, batch, inp, hidden, dtype, layers=1, bidirectional=False, seed=0):
    key = (kind, length, batch, inp, hidden, jnp.dtype(dtype).name, layers, bidirectional, seed)
    params, x, state = _kept(("problem", *key), lambda: _draw_problem(*key))
    return dict(params), x, state  # a dict of its own: a test may change its copy


def _draw_problem(kind, length, batch, inp, hidden, dtype, layers, bidirectional, seed):
    keys = jax.random.split(jax.random.key(seed), 4)
    params = LAYERS[kind][1](
        keys[0], inp, hidden, num_layers=layers, bidirectional=bidirectional, dtype=dtype
    )
    rows = layers * (2 if bidirectional else 1)
    x = jax.random.normal(keys[1], (length, batch, inp), dtype)
    state = tuple(jax.random.normal(k, (rows, batch, hidden), dtype) for k in keys[2:])
    return params, x, state if kind == "lstm" else state[0]


def assert_matches_the_scan_path(impl, kind, size, dtype, tol, argnums=(0, 1, 2)):
    """``impl`` gives the ``lax.scan`` path's loss and gradients (parameters, input, initial
    state; or, with ``argnums=0``, the parameters alone: a backward may then skip the input's) for
    a 2-layer bidirectional layer of ``size = (L, N, I, H)``, padded and packed."""
    length, batch, inp, hidden = size
    params, x, state = _problem(
        kind, length, batch, inp, hidden, dtype, layers=2, bidirectional=True
    )
    lengths = jnp.arange(batch) % (length + 1)  # 0 (state passes through) up to full length
    for kw in ({}, {"seq_lengths": lengths}):
        got = _value_and_grads(kind, params, x, state, impl, argnums, **kw)
        # The reference holds all three arguments' gradients; argnums picks those impl gave.
        value, grads = _kept(
            ("train", kind, size, jnp.dtype(dtype).name, bool(kw)),
            lambda kw=kw: _value_and_grads(kind, params, x, state, "fused", **kw),
        )
        picked = grads[argnums] if isinstance(argnums, int) else tuple(grads[i] for i in argnums)
        assert_trees_close(got, (value, picked), rtol=tol, atol=tol)


def assert_forward_matches_the_scan_path(impl, kind, size, dtype, tol):
    """``impl``'s call without gradients, which may run other kernels than its training forward
    (jlstm.native: a bidirectional layer's two directions in one call), gives the ``lax.scan``
    path's outputs and final states for a 2-layer bidirectional layer of ``size = (L, N, I, H)``,
    padded and packed."""
    length, batch, inp, hidden = size
    params, x, state = _problem(
        kind, length, batch, inp, hidden, dtype, layers=2, bidirectional=True
    )
    lengths = jnp.arange(batch) % (length + 1)  # 0 (state passes through) up to full length
    for kw in ({}, {"seq_lengths": lengths}):

        def forward(params, x, state, impl, kw=kw):
            return LAYERS[kind][0](params, x, state, impl=impl, **kw)

        forward = jax.jit(forward, static_argnames="impl")
        got = forward(params, x, state, impl=impl)
        want = _kept(
            ("forward", kind, size, jnp.dtype(dtype).name, bool(kw)),
            lambda forward=forward: forward(params, x, state, impl="fused"),
        )
        assert_trees_close(got, want, rtol=tol, atol=tol)
