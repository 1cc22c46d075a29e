"""from_torch / to_torch round trips and pad_sequence, against torch where it is installed."""

import cases
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlstm

# One case per module family, covering projection, both directions, several layers, no bias, cells.
IO_CASES = [
    cases.Case("lstm", 3, num_layers=2, bidirectional=True, proj_size=2),
    cases.Case("lstm", 3, num_layers=3, bias=False),
    cases.Case("gru", 3, num_layers=2, bidirectional=True),
    cases.Case("rnn_tanh", 3, num_layers=2, bias=False, bidirectional=True),
    cases.Case("rnn_relu", 3),
    cases.Case("lstm_cell", 3),
    cases.Case("gru_cell", 3, bias=False),
    cases.Case("rnn_tanh_cell", 3),
]
IO_PARAMS = [pytest.param(case, id=case.id) for case in IO_CASES]
DTYPES = [np.float32, np.float64]


def _weights(arrays: dict) -> dict[str, np.ndarray]:
    return {k.removeprefix("param."): v for k, v in arrays.items() if k.startswith("param.")}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("case", IO_PARAMS)
def test_round_trip_is_bitwise(case, dtype):
    state_dict = _weights(cases.make_arrays(case, dtype))
    params = jlstm.from_torch(state_dict)
    assert list(params) == list(state_dict)
    assert all(isinstance(v, jax.Array) and v.dtype == dtype for v in params.values())
    back = jlstm.to_torch(params)
    assert list(back) == list(state_dict)  # torch's state_dict order
    for name, value in state_dict.items():
        assert isinstance(back[name], np.ndarray) and back[name].dtype == dtype, name
        np.testing.assert_array_equal(back[name], value, err_msg=name)
    again = jlstm.from_torch(back)
    for name in params:
        np.testing.assert_array_equal(again[name], params[name], err_msg=name)


@pytest.mark.parametrize("case", IO_PARAMS)
def test_from_torch_takes_torch_tensors(torch, case):
    module = cases.torch_module(case, cases.make_arrays(case, np.float64))
    params = jlstm.from_torch(module.state_dict())
    assert list(params) == list(module.state_dict())
    for name, tensor in module.state_dict().items():
        assert params[name].dtype == jnp.float64
        np.testing.assert_array_equal(params[name], tensor.numpy(), err_msg=name)


def _init(case: cases.Case, key):
    if case.is_cell:
        fn = {"lstm": jlstm.init_lstm_cell, "gru": jlstm.init_gru_cell, "rnn": jlstm.init_rnn_cell}
        kw = {"nonlinearity": case.nonlinearity} if case.base == "rnn" else {}
        return fn[case.base](key, case.input_size, case.hidden_size, bias=case.bias, **kw)
    kw = dict(bias=case.bias, bidirectional=case.bidirectional)
    if case.base == "lstm":
        kw["proj_size"] = case.proj_size
    elif case.base == "rnn":
        kw["nonlinearity"] = case.nonlinearity
    fn = {"lstm": jlstm.init_lstm, "gru": jlstm.init_gru, "rnn": jlstm.init_rnn}[case.base]
    return fn(key, case.input_size, case.hidden_size, case.num_layers, **kw)


@pytest.mark.parametrize("case", IO_PARAMS)
def test_to_torch_loads_strictly_and_gives_the_same_output(torch, case):
    """jlstm.init_* params load into the torch module (strict) and both compute the same thing."""
    params = _init(case, jax.random.key(0))
    arrays = cases.make_arrays(case, np.float32)
    module = cases.torch_module(case, arrays)  # random weights, overwritten below
    state_dict = jlstm.to_torch(params)
    module.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)
    for name, tensor in module.state_dict().items():
        np.testing.assert_array_equal(tensor.numpy(), np.asarray(params[name]), err_msg=name)
    arrays |= {f"param.{k}": v for k, v in state_dict.items()}
    want = cases.torch_reference(case, arrays)
    x = jnp.asarray(arrays["x"])
    state = [jnp.asarray(arrays[n]) for n in cases.state_names(case)]
    if case.is_cell:
        fn = {"lstm": jlstm.lstm_cell, "gru": jlstm.gru_cell, "rnn": jlstm.rnn_cell}[case.base]
        kw = {"nonlinearity": case.nonlinearity} if case.base == "rnn" else {}
        got = fn(params, x, tuple(state) if case.base == "lstm" else state[0], **kw)
        got = got if case.base == "lstm" else (got,)
    else:
        fn = {"lstm": jlstm.lstm, "gru": jlstm.gru, "rnn": jlstm.rnn}[case.base]
        kw = {"nonlinearity": case.nonlinearity} if case.base == "rnn" else {}
        output, finals = fn(params, x, tuple(state) if case.base == "lstm" else state[0], **kw)
        got = (output, *finals) if case.base == "lstm" else (output, finals)
    for name, value in zip(cases.output_names(case), got, strict=True):
        assert value.dtype == jnp.float32, name
        np.testing.assert_allclose(value, want[name], rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("padding_value", [0.0, -3.5], ids=["pad0", "pad-3.5"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["time_major", "batch_first"])
@pytest.mark.parametrize("trailing", [(), (2, 3)], ids=["1d", "3d"])
def test_pad_sequence_equals_torch(torch, trailing, batch_first, padding_value):
    rng = np.random.default_rng(0)
    seqs = [rng.standard_normal((n, *trailing)) for n in (3, 1, 5, 5)]
    want = torch.nn.utils.rnn.pad_sequence(
        [torch.from_numpy(s) for s in seqs], batch_first=batch_first, padding_value=padding_value
    ).numpy()
    got = jlstm.pad_sequence(
        [jnp.asarray(s) for s in seqs], batch_first=batch_first, padding_value=padding_value
    )
    assert got.dtype == jnp.float64
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)


def test_pad_sequence_single_and_equal_lengths():
    """No torch needed: one sequence, all of length 1, exact placement of the padding."""
    one = jlstm.pad_sequence([jnp.arange(3.0)])
    assert one.shape == (3, 1)
    np.testing.assert_array_equal(one[:, 0], jnp.arange(3.0))
    seqs = [jnp.full((1, 2), v, jnp.float32) for v in (1.0, 2.0)]
    np.testing.assert_array_equal(
        jlstm.pad_sequence(seqs, batch_first=True), jnp.array([[[1.0, 1.0]], [[2.0, 2.0]]])
    )
    padded = jlstm.pad_sequence([jnp.ones(2), jnp.ones(4)], batch_first=True, padding_value=9.0)
    np.testing.assert_array_equal(padded, [[1, 1, 9, 9], [1, 1, 1, 1]])
