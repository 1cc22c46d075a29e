"""The hand-written backward of jlstm.fused equals autodiff through the reference scan over the
cell, for both placements of the input projection (hoisted out of the loop or inside each step)."""

import jax
import jax.numpy as jnp
import pytest
from trees import assert_trees_close, probe_loss

import jlstm
from jlstm import backends
from jlstm import params as P

KEY = jax.random.key(7)
LENGTHS = jnp.array([6, 0, 3, 1])


def _reference(kind, w, x, carry, valid, reverse):
    """The same direction as autodiff through lax.scan over the cell (impl='scan')."""
    carry, ys = backends.direction("scan", kind, w, x, carry, valid, reverse)
    return ys, carry


@pytest.mark.parametrize("hoist", [False, True], ids=["inside", "hoisted"])
@pytest.mark.parametrize("masked", [False, True], ids=["dense", "lengths"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_fused_direction_matches_autodiff(kind, bias, reverse, masked, hoist):
    init = jlstm.init_lstm if kind == "lstm" else jlstm.init_gru
    params = init(KEY, 3, 5, bias=bias, dtype=jnp.float64)
    # Non-zero biases even where init would give small ones, so bias gradients are exercised.
    params = {k: v + 0.3 if k.startswith("bias") else v for k, v in params.items()}
    x = jax.random.normal(KEY, (6, 4, 3), jnp.float64)
    h0 = jax.random.normal(jax.random.key(1), (4, 5), jnp.float64)
    carry = (h0, 2 * h0) if kind == "lstm" else h0
    valid = (jnp.arange(6)[:, None] < LENGTHS[None, :])[..., None] if masked else None

    def loss(run, params, x, carry):
        w = P.layer_structure("test", kind, params).layers[0][0]
        return probe_loss(*run(w, x, carry))

    def fused(w, x, carry):
        carry, ys = backends.direction("fused", kind, w, x, carry, valid, reverse, hoist=hoist)
        return ys, carry

    def reference(w, x, carry):
        return _reference(kind, w, x, carry, valid, reverse)

    got = jax.value_and_grad(lambda *a: loss(fused, *a), argnums=(0, 1, 2))(params, x, carry)
    want = jax.value_and_grad(lambda *a: loss(reference, *a), argnums=(0, 1, 2))(params, x, carry)
    assert_trees_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("every", [None, 2], ids=["default", "checkpoint_every"])
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_float32_params_with_float64_input(kind, every):
    """Mixed dtypes compute in the promoted dtype, as the reference path does, and every gradient
    comes back in its own argument's dtype."""
    fn, init = (jlstm.lstm, jlstm.init_lstm) if kind == "lstm" else (jlstm.gru, jlstm.init_gru)
    params = init(KEY, 3, 5, bidirectional=True)  # float32
    x = jax.random.normal(KEY, (6, 4, 3), jnp.float64)

    def grads(impl):
        return jax.grad(
            lambda p, x: jnp.sum(jnp.sin(fn(p, x, impl=impl, checkpoint_every=every)[0])), (0, 1)
        )(params, x)

    got, want = grads("auto"), grads("scan")
    for g, w, arg in zip(
        jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves((params, x)), strict=True
    ):
        assert g.dtype == arg.dtype, (g.dtype, arg.dtype)
        assert jnp.allclose(g, w, rtol=1e-6, atol=1e-6), float(jnp.abs(g - w).max())
