"""Parity with torch over the grid in tests/cases.py: outputs, final states and gradients.

Golden tests read tests/golden/golden.npz (made by tests/golden/make_golden.py) and need no torch;
live tests rebuild the same grid with torch when it is installed, in float64 and float32.
"""

from functools import partial
from pathlib import Path

import cases
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlstm

GOLDEN = Path(__file__).parent / "golden" / "golden.npz"
INPUTS = ("param.", "R.", "x", "h0", "c0", "lengths")
CASES = [pytest.param(case, id=case.id) for case in cases.CASES]
# float32 compiles everything a second time; a covering subset keeps every kind x feature.
F32_CASES = [pytest.param(case, id=case.id) for case in cases.covering_subset(cases.CASES)]
# LSTM and GRU layers have four fast paths, each run on the grid: the C++ loop (jlstm.native,
# impl="auto" on CPU), the lax.scan loop with the hand-written backward (impl="fused", auto's choice
# on GPU/TPU), the Pallas kernels (impl="pallas", interpreted here) and, for LSTM, cuDNN through
# jax.experimental.rnn (impl="cudnn", its reference standing in for the cuDNN call here).
FAST_PATHS = [
    pytest.param(impl, case, id=f"{impl}-{case.id}")
    for impl in ("native", "fused", "pallas", "cudnn")
    for (case,) in (c.values for c in CASES)
    if case.base in ("lstm", "gru") and not case.is_cell and not case.proj_size
    if impl != "cudnn" or case.base == "lstm"
]


def _forward(case: cases.Case, params, x, state, lengths, impl) -> dict:
    """jlstm's outputs for `case`, named as in cases.output_names."""
    if case.is_cell:
        if case.base == "lstm":
            return dict(zip(("h", "c"), jlstm.lstm_cell(params, x, state), strict=True))
        if case.base == "gru":
            return {"h": jlstm.gru_cell(params, x, state)}
        return {"h": jlstm.rnn_cell(params, x, state, nonlinearity=case.nonlinearity)}
    kw = dict(batch_first=case.batch_first, seq_lengths=lengths)
    if case.base == "lstm":
        output, (h_n, c_n) = jlstm.lstm(params, x, state, impl=impl, **kw)
        return {"output": output, "h_n": h_n, "c_n": c_n}
    if case.base == "gru":
        output, h_n = jlstm.gru(params, x, state, impl=impl, **kw)
    else:
        output, h_n = jlstm.rnn(params, x, state, nonlinearity=case.nonlinearity, **kw)
    return {"output": output, "h_n": h_n}


@partial(jax.jit, static_argnames=("case", "impl"))
def _outputs_and_grads(case: cases.Case, params, x, state, lengths, weights, impl) -> dict:
    def loss(params, x, state):
        outputs = _forward(case, params, x, state, lengths, impl)
        return sum(jnp.sum(out * weights[k]) for k, out in outputs.items()), outputs

    (value, outputs), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
        params, x, state
    )
    result = dict(outputs, loss=value, **{"grad.x": grads[1]})
    result |= {f"grad.param.{k}": g for k, g in grads[0].items()}
    if state is not None:
        names = cases.state_names(case)
        states = grads[2] if case.base == "lstm" else (grads[2],)
        result |= {f"grad.{name}": g for name, g in zip(names, states, strict=True)}
    return result


def jlstm_reference(case: cases.Case, arrays: dict, impl="auto") -> dict[str, np.ndarray]:
    """What cases.torch_reference returns, computed by jlstm (params through from_torch)."""
    params = jlstm.from_torch(
        {k.removeprefix("param."): v for k, v in arrays.items() if k.startswith("param.")}
    )
    states = [jnp.asarray(arrays[name]) for name in cases.state_names(case) if name in arrays]
    state = (tuple(states) if case.base == "lstm" else states[0]) if states else None
    lengths = jnp.asarray(arrays["lengths"]) if "lengths" in arrays else None
    weights = {
        k.removeprefix("R."): jnp.asarray(v) for k, v in arrays.items() if k.startswith("R.")
    }
    result = _outputs_and_grads(
        case, params, jnp.asarray(arrays["x"]), state, lengths, weights, impl
    )
    return {k: np.asarray(v) for k, v in result.items()}


def assert_matches(got: dict, want: dict, dtype, rtol: float, atol: float) -> None:
    assert sorted(got) == sorted(want), "jlstm and torch produce different sets of results"
    for name, w in want.items():
        g = got[name]
        assert g.dtype == dtype, f"{name}: dtype {g.dtype}, expected {dtype}"
        assert g.shape == w.shape, f"{name}: shape {g.shape}, expected {w.shape}"
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol, err_msg=name)


@pytest.fixture(scope="module")
def golden() -> dict[str, dict[str, np.ndarray]]:
    """{case id: {name: array}} from golden.npz."""
    by_case: dict[str, dict[str, np.ndarray]] = {}
    with np.load(GOLDEN) as data:
        for key in data.files:
            if "/" in key:
                case_id, name = key.split("/", 1)
                by_case.setdefault(case_id, {})[name] = data[key]
    return by_case


def _split(arrays: dict) -> tuple[dict, dict]:
    """(inputs, torch's results) of one golden case."""
    inputs = {k: v for k, v in arrays.items() if k.startswith(INPUTS)}
    return inputs, {k: v for k, v in arrays.items() if not k.startswith((*INPUTS, "spec"))}


def test_golden_covers_the_grid(golden):
    assert sorted(golden) == sorted(case.id for case in cases.CASES), (
        "golden.npz is out of date with tests/cases.py: run tests/golden/make_golden.py"
    )
    for case in cases.CASES:
        assert str(golden[case.id]["spec"]) == repr(case), f"{case.id}: regenerate golden.npz"


@pytest.mark.parametrize("case", CASES)
def test_golden_float64(golden, case):
    inputs, want = _split(golden[case.id])
    got = jlstm_reference(case, inputs)
    assert_matches(got, want, np.float64, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("impl,case", FAST_PATHS)
def test_golden_float64_each_fast_path(golden, impl, case, request):
    if impl == "cudnn":
        request.getfixturevalue("cudnn_on_cpu")
    inputs, want = _split(golden[case.id])
    got = jlstm_reference(case, inputs, impl)
    assert_matches(got, want, np.float64, rtol=1e-9, atol=1e-9)


def test_golden_matches_live_torch(torch, golden):
    """The fixtures are what the current grid and torch give (inputs bitwise, results to 1e-12)."""
    for case in cases.CASES:
        inputs, stored = _split(golden[case.id])
        arrays = cases.make_arrays(case, np.float64)
        assert sorted(inputs) == sorted(arrays), case.id
        for name, value in arrays.items():
            np.testing.assert_array_equal(inputs[name], value, err_msg=f"{case.id}: {name}")
        live = cases.torch_reference(case, arrays)
        assert sorted(live) == sorted(stored), case.id
        for name, value in live.items():
            np.testing.assert_allclose(stored[name], value, rtol=1e-12, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("case", CASES)
def test_live_float64(torch, case):
    arrays = cases.make_arrays(case, np.float64)
    want = cases.torch_reference(case, arrays)
    assert_matches(jlstm_reference(case, arrays), want, np.float64, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("case", F32_CASES)
def test_live_float32(torch, case):
    arrays = cases.make_arrays(case, np.float32)
    want = cases.torch_reference(case, arrays)
    assert_matches(jlstm_reference(case, arrays), want, np.float32, rtol=1e-5, atol=1e-6)


def test_naive_lstm_tutorial(torch):
    """Every weight 0.5, input, h0 and c0 all ones (input 10, hidden 20): jlstm.lstm equals torch."""
    module = torch.nn.LSTM(10, 20)
    for p in module.parameters():
        torch.nn.init.constant_(p, 0.5)
    x, h0, c0 = torch.ones(3, 1, 10), torch.ones(1, 1, 20), torch.ones(1, 1, 20)
    with torch.no_grad():
        want, (want_h, want_c) = module(x, (h0, c0))
    params = jlstm.from_torch(module.state_dict())
    got, (h, c) = jlstm.lstm(params, jnp.ones((3, 1, 10), jnp.float32), (h0.numpy(), c0.numpy()))
    for g, w in ((got, want), (h, want_h), (c, want_c)):
        assert g.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(g), w.numpy(), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# dropout: torch's rule (outputs of every layer but the last, scaled by 1/(1-p)), only with a key


def _init(kind: str, key, *args, **kw):
    init = {"lstm": jlstm.init_lstm, "gru": jlstm.init_gru, "rnn": jlstm.init_rnn}[kind]
    return init(key, *args, dtype=jnp.float64, **kw)


@partial(jax.jit, static_argnames=("kind", "dropout"))
def _call(kind: str, params, x, dropout=0.0, key=None):
    fn = {"lstm": jlstm.lstm, "gru": jlstm.gru, "rnn": jlstm.rnn}[kind]
    return fn(params, x, dropout=dropout, key=key)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_dropout_needs_key_and_is_deterministic_per_key(kind):
    params = _init(kind, jax.random.key(0), 4, 8, num_layers=2)
    x = jax.random.normal(jax.random.key(1), (6, 3, 4), jnp.float64)
    plain = _call(kind, params, x)
    no_key = _call(kind, params, x, dropout=0.5)
    first = _call(kind, params, x, dropout=0.5, key=jax.random.key(2))
    again = _call(kind, params, x, dropout=0.5, key=jax.random.key(2))
    other = _call(kind, params, x, dropout=0.5, key=jax.random.key(3))
    jax.tree.map(np.testing.assert_array_equal, no_key, plain)
    jax.tree.map(np.testing.assert_array_equal, first, again)
    assert not np.allclose(first[0], plain[0])
    assert not np.allclose(first[0], other[0])


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_dropout_skips_the_last_layer(kind):
    """A single (bidirectional) layer has no inter-layer output: dropout with a key changes nothing."""
    params = _init(kind, jax.random.key(0), 4, 8, bidirectional=True)
    x = jax.random.normal(jax.random.key(1), (6, 3, 4), jnp.float64)
    plain = _call(kind, params, x)
    dropped = _call(kind, params, x, dropout=0.5, key=jax.random.key(2))
    jax.tree.map(np.testing.assert_array_equal, dropped, plain)


def test_dropout_zeroes_and_rescales_inter_layer_outputs():
    """A 2-layer ReLU RNN whose second layer is the identity (W_ih = I, W_hh = 0, no bias) outputs
    exactly the dropped-out first-layer output: each element is 0 or y1 / (1 - p)."""
    p, hidden = 0.3, 16
    params = _init("rnn", jax.random.key(0), 4, hidden, 2, nonlinearity="relu", bias=False)
    params |= {"weight_ih_l1": jnp.eye(hidden), "weight_hh_l1": jnp.zeros((hidden, hidden))}
    x = jax.random.normal(jax.random.key(1), (20, 8, 4), jnp.float64)
    first = {k: v for k, v in params.items() if k.endswith("l0")}
    relu = jax.jit(partial(jlstm.rnn, nonlinearity="relu", dropout=p))
    y1, h1 = relu(first, x)
    out, h_n = relu(params, x, key=jax.random.key(5))
    kept = np.asarray(out != 0)
    y1 = np.asarray(y1)
    np.testing.assert_allclose(np.asarray(out)[kept], y1[kept] / (1 - p), rtol=1e-12)
    dropped_fraction = 1 - kept[y1 > 0].mean()
    assert 0.2 < dropped_fraction < 0.4, dropped_fraction
    np.testing.assert_array_equal(h_n[0], h1[0])  # the first layer's own state is not dropped
    np.testing.assert_array_equal(h_n[1], out[-1])
