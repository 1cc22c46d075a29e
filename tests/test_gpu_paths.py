"""The GPU paths, checked on this CPU: the Pallas kernels (jlstm.pallas, interpreted here) give the
lax.scan path's outputs, states and gradients on a grid that crosses their padding edges (1 unit,
tiles of 16, two and four chunks of 64 units) and lower to Triton IR for CUDA; the cuDNN path
(jlstm.cudnn) gets its weights, layout, lengths and dropout right, with jax.experimental.rnn's
reference standing in for the cuDNN call. Both are refused where they cannot run. Torch parity of
both is in test_torch_parity.py."""

import jax
import jax.numpy as jnp
import pytest
from paths import LAYERS, _problem, _value_and_grads, assert_matches_the_scan_path
from trees import assert_trees_close

from jlstm import pallas

KINDS = pytest.mark.parametrize("kind", list(LAYERS))

# (L, N, I, H): 1 everywhere; hidden 15/16/17 around the smallest tile of 16; batch 17 = a block of
# 16 sequences + 1; hidden 128 in two chunks of 64 units, 200 padded to 256 in four.
SIZES = [(1, 1, 1, 1), (4, 17, 3, 15), (3, 2, 5, 16), (5, 3, 1, 17), (2, 4, 6, 128), (2, 3, 2, 200)]


@pytest.mark.parametrize(
    "dtype,tol", [(jnp.float64, 1e-12), (jnp.float32, 2e-5)], ids=["f64", "f32"]
)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "L{}-N{}-I{}-H{}".format(*s))
@KINDS
def test_pallas_matches_the_scan_path(kind, size, dtype, tol):
    assert_matches_the_scan_path("pallas", kind, size, dtype, tol)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64], ids=["f32", "f64"])
@KINDS
def test_pallas_lowers_to_triton_for_cuda(kind, dtype):
    """The training step lowers for CUDA with both kernels (forward saving the gates, backward) as
    Triton custom calls, packed and reversed, at the smallest and the largest tile."""
    for hidden in (1, pallas.MAX_HIDDEN):
        params, x, state = _problem(kind, 5, 20, 3, hidden, dtype, bidirectional=True)
        lengths = jnp.array([5, 0, 2, 1] * 5)

        def loss(params, x, state=state, lengths=lengths):
            out, _ = LAYERS[kind][0](params, x, state, seq_lengths=lengths, impl="pallas")
            return jnp.sum(out)

        text = pallas.lowered_for_cuda(jax.grad(loss, argnums=(0, 1)), params, x)
        assert text.count("__gpu$xla.gpu.triton") == 4, kind  # 2 kernels x 2 directions


def _cudnn_problem(dtype=jnp.float64, bias=True):
    params, x, state = _problem("lstm", 6, 4, 3, 5, dtype, layers=3, bidirectional=True)
    if not bias:
        params = {k: v for k, v in params.items() if not k.startswith("bias")}
    return params, x, state


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_cudnn_matches_the_scan_path(cudnn_on_cpu, bias):
    params, x, state = _cudnn_problem(bias=bias)
    batch_major = jnp.swapaxes(x, 0, 1)
    for x_, kw in (
        (x, {}),
        (x, {"seq_lengths": jnp.array([6, 1, 3, 5])}),
        (batch_major, {"batch_first": True}),
    ):
        got = _value_and_grads("lstm", params, x_, state, "cudnn", **kw)
        want = _value_and_grads("lstm", params, x_, state, "fused", **kw)
        assert_trees_close(got, want, rtol=1e-12, atol=1e-12)


def test_cudnn_applies_dropout_between_layers_as_the_other_paths(cudnn_on_cpu):
    params, x, state = _cudnn_problem()
    key = jax.random.key(3)
    kw = dict(dropout=0.4, key=key)
    got = _value_and_grads("lstm", params, x, state, "cudnn", **kw)
    want = _value_and_grads("lstm", params, x, state, "fused", **kw)
    assert_trees_close(got, want, rtol=1e-12, atol=1e-12)
    undropped = _value_and_grads("lstm", params, x, state, "cudnn")
    assert not jnp.allclose(got[0], undropped[0])  # the masks were applied


def test_cudnn_refuses_empty_sequences(cudnn_on_cpu):
    params, x, state = _cudnn_problem()
    with pytest.raises(
        ValueError,
        match=r"impl='cudnn' \(cuDNN through jax.experimental.rnn\) cannot run this call: cuDNN has "
        r"no empty sequences, every seq_length must be >= 1 but one is 0; use impl='auto'",
    ):
        LAYERS["lstm"][0](params, x, state, seq_lengths=jnp.array([6, 0, 3, 5]), impl="cudnn")


@pytest.mark.parametrize(
    "kind,impl,hidden,dtype,match",
    [
        (
            "gru",
            "cudnn",
            4,
            jnp.float32,
            r"gru: impl='cudnn' \(cuDNN through jax.experimental.rnn\) cannot run this call: it "
            r"covers LSTM without proj_size, this is a GRU; use impl='auto'",
        ),
        (
            "lstm",
            "cudnn",
            4,
            jnp.float64,
            r"impl='cudnn' \(cuDNN through jax.experimental.rnn\) cannot run this call: it runs "
            r"float32, this call is float64; use impl='auto'",
        ),
        (
            "lstm",
            "pallas",
            257,
            jnp.float32,
            r"impl='pallas' \(the Pallas kernels\) cannot run this call: hidden_size 257 "
            r"is over 256, the largest it takes; use impl='auto'",
        ),
        (
            "gru",
            "pallas",
            4,
            jnp.bfloat16,
            r"impl='pallas' \(the Pallas kernels\) cannot run this call: it runs "
            r"float32 or float64, this call is bfloat16; use impl='auto'",
        ),
    ],
)
def test_refused_where_they_cannot_run(kind, impl, hidden, dtype, match):
    params, x, state = _problem(kind, 2, 3, 4, hidden, dtype)
    with pytest.raises(ValueError, match=match):
        LAYERS[kind][0](params, x, state, impl=impl)


def test_cudnn_refuses_checkpoint_every():
    params, x, state = _problem("lstm", 2, 3, 4, 5, jnp.float32)
    with pytest.raises(
        ValueError, match=r"impl='cudnn' .* cannot run this call: cuDNN keeps its own activations"
    ):
        LAYERS["lstm"][0](params, x, state, impl="cudnn", checkpoint_every=1)
