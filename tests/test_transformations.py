"""Every JAX transformation on every implementation equals the same transformation of the plain
``lax.scan`` path (``impl="scan"``), for LSTM and GRU, bidirectional with lengths and given initial
states; and a training step on the default path still runs the C++ forward that saves and the C++
backward exactly once per direction (no recomputation, no fallback to the reference)."""

import jax
import jax.numpy as jnp
import pytest
from trees import assert_trees_close, probe_loss

import jlstm

LAYERS = {"lstm": (jlstm.lstm, jlstm.init_lstm), "gru": (jlstm.gru, jlstm.init_gru)}
L, N, IN, H = 3, 2, 2, 3  # tiny: Pallas runs interpreted here
LENGTHS = jnp.array([3, 1])


def _problem(kind):
    keys = jax.random.split(jax.random.key(4), 4)
    params = LAYERS[kind][1](keys[0], IN, H, bidirectional=True, dtype=jnp.float64)
    x = jax.random.normal(keys[1], (L, N, IN), jnp.float64)
    h0 = jax.random.normal(keys[2], (2, N, H), jnp.float64)
    state = (h0, jax.random.normal(keys[3], (2, N, H), jnp.float64)) if kind == "lstm" else h0
    return params, x, state


def _loss(kind, impl, state):
    def loss(params, x):
        return probe_loss(*LAYERS[kind][0](params, x, state, seq_lengths=LENGTHS, impl=impl))

    return loss


def _grad_of_grad(f):
    """d/dparams of |df/dx|^2: a gradient penalty, what meta-learning and HVPs need."""
    return jax.grad(lambda p, x: jnp.sum(jax.grad(f, argnums=1)(p, x) ** 2))


TRANSFORMATIONS = {
    "jit": lambda f: jax.jit(f),
    "grad": lambda f: jax.grad(f, argnums=(0, 1)),
    "grad_of_weights": lambda f: jax.grad(f),  # the input's gradient is not needed
    "hessian_of_weights": lambda f: jax.hessian(f),
    "grad_of_grad": _grad_of_grad,
    "jvp": lambda f: lambda p, x: jax.jvp(f, (p, x), (p, jnp.cos(x))),
    "jacfwd": lambda f: jax.jacfwd(f, argnums=1),
    "jacrev": lambda f: jax.jacrev(f, argnums=1),
    "hessian": lambda f: jax.hessian(f, argnums=1),
    "jacrev_of_jacrev": lambda f: jax.jacrev(jax.jacrev(f, argnums=1), argnums=1),
    "vmap": lambda f: lambda p, x: jax.vmap(f, in_axes=(None, 0))(p, jnp.stack([x, -2 * x])),
    "vmap_of_grad": lambda f: (
        lambda p, x: jax.vmap(jax.grad(f), in_axes=(None, 0))(p, jnp.stack([x, -2 * x]))
    ),
    "grad_of_vmap": lambda f: jax.grad(
        lambda p, x: jnp.sum(jax.vmap(f, in_axes=(None, 0))(p, jnp.stack([x, -2 * x])))
    ),
    "checkpoint": lambda f: jax.grad(jax.checkpoint(f), argnums=(0, 1)),
}


@pytest.mark.parametrize("transformation", list(TRANSFORMATIONS))
@pytest.mark.parametrize("impl", ["auto", "native", "fused", "pallas"])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_transformation_matches_the_scan_path(kind, impl, transformation):
    params, x, state = _problem(kind)
    transform = TRANSFORMATIONS[transformation]
    got = transform(_loss(kind, impl, state))(params, x)
    want = transform(_loss(kind, "scan", state))(params, x)
    assert_trees_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("transformation", list(TRANSFORMATIONS))
def test_cudnn_plumbing_under_transformations(cudnn_on_cpu, transformation):
    """With jax.experimental.rnn's reference standing in for the cuDNN call (see conftest): the
    call goes through jlstm.loops like the other fast loops, so what runs for the stand-in here
    (its VJP for grad, lin_p's reference rules beyond) is what runs for cuDNN on a GPU."""
    params, x, state = _problem("lstm")
    transform = TRANSFORMATIONS[transformation]
    got = transform(_loss("lstm", "cudnn", state))(params, x)
    want = transform(_loss("lstm", "scan", state))(params, x)
    assert_trees_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_default_training_step_runs_the_fast_kernels_once_per_direction(kind):
    """2 layers x 2 directions: 4 saving forwards and 4 backwards in the CPU lowering, and neither
    the inference kernel nor any trace of the reference's forward-mode rules."""
    params = LAYERS[kind][1](jax.random.key(0), 3, 8, num_layers=2, bidirectional=True)
    x = jnp.ones((5, 4, 3))
    loss = lambda p: jnp.sum(LAYERS[kind][0](p, x, seq_lengths=jnp.array([5, 1, 3, 0]))[0] ** 2)  # noqa: E731
    text = jax.jit(jax.grad(loss)).lower(params).as_text()
    assert text.count(f"@jlstm_{kind}_forward(") == 4
    assert text.count(f"@jlstm_{kind}_backward(") == 4
    assert "jlstm_lstm_inference" not in text
    jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params))
    assert "jlstm_loop_tangent" not in jaxpr  # transposed away into the backward


@pytest.mark.parametrize("kind", list(LAYERS))
def test_default_inference_runs_the_kernel_that_saves_nothing(kind):
    params = LAYERS[kind][1](jax.random.key(0), 3, 8)
    text = jax.jit(lambda p, x: LAYERS[kind][0](p, x)[0]).lower(params, jnp.ones((5, 4, 3)))
    target = "jlstm_lstm_inference" if kind == "lstm" else "jlstm_gru_forward"
    assert text.as_text().count(f"@{target}(") == 1
