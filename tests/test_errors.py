"""Bad input raises a ValueError/TypeError that names what was expected, what was received and the fix."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlstm

KEY = jax.random.key(0)
LSTM = jlstm.init_lstm(KEY, 4, 6, num_layers=2)
GRU = jlstm.init_gru(KEY, 4, 6)
X = jnp.ones((5, 3, 4))  # (L, N, I)


def test_wrong_rank():
    with pytest.raises(
        ValueError, match=r"x has shape \(3, 5, 2, 4\).*must be \(seq_len, batch, input_size\)"
    ):
        jlstm.lstm(LSTM, jnp.ones((3, 5, 2, 4)))


def test_wrong_input_size():
    with pytest.raises(
        ValueError,
        match=r"x has shape \(5, 3, 7\) but weight_ih_l0 expects input_size 4.*batch_first=True",
    ):
        jlstm.lstm(LSTM, jnp.ones((5, 3, 7)))


def test_wrong_input_size_batch_first_names_layout():
    with pytest.raises(ValueError, match=r"x must be \(batch, seq_len, input_size\)"):
        jlstm.gru(GRU, jnp.ones((3, 5, 7)), batch_first=True)


def test_integer_input():
    with pytest.raises(TypeError, match=r"x has dtype int32; expected a floating dtype.*astype"):
        jlstm.lstm(LSTM, jnp.ones((5, 3, 4), jnp.int32))


def test_h0_wrong_shape():
    with pytest.raises(
        ValueError, match=r"h0 has shape \(1, 3, 6\) but must be .* = \(2, 3, 6\).*None for zeros"
    ):
        jlstm.lstm(LSTM, X, (jnp.zeros((1, 3, 6)), jnp.zeros((2, 3, 6))))


def test_c0_wrong_shape():
    with pytest.raises(
        ValueError,
        match=r"c0 has shape \(2, 4, 6\) but must be \(D\*num_layers, batch, hidden_size\) = \(2, 3, 6\)",
    ):
        jlstm.lstm(LSTM, X, (jnp.zeros((2, 3, 6)), jnp.zeros((2, 4, 6))))


def test_gru_h0_wrong_shape():
    with pytest.raises(
        ValueError, match=r"gru: h0 has shape \(1, 3, 5\) but must be .* = \(1, 3, 6\)"
    ):
        jlstm.gru(GRU, X, jnp.zeros((1, 3, 5)))


def test_unbatched_state_shape():
    with pytest.raises(
        ValueError,
        match=r"h0 has shape \(2, 1, 6\) but must be \(D\*num_layers, H_out\) = \(2, 6\)",
    ):
        jlstm.lstm(LSTM, jnp.ones((5, 4)), (jnp.zeros((2, 1, 6)), jnp.zeros((2, 6))))


@pytest.mark.parametrize(
    "state", [jnp.zeros((2, 3, 6)), (jnp.zeros((2, 3, 6)),)], ids=["array", "1-tuple"]
)
def test_lstm_state_not_a_pair(state):
    with pytest.raises(
        ValueError, match=r"state must be a pair \(h0, c0\) or None, got .*\(h_0, c_0\)"
    ):
        jlstm.lstm(LSTM, X, state)


def test_seq_lengths_wrong_length():
    with pytest.raises(
        ValueError,
        match=r"seq_lengths has shape \(2,\) but x has batch size 3; expected shape \(3,\)",
    ):
        jlstm.lstm(LSTM, X, seq_lengths=jnp.array([5, 2]))


@pytest.mark.parametrize("lengths", [[5, 6, 1], [5, -1, 1]], ids=["too-long", "negative"])
def test_seq_lengths_out_of_range(lengths):
    with pytest.raises(
        ValueError, match=r"seq_lengths must lie in \[0, 5\].*got min -?\d+ and max \d+"
    ):
        jlstm.gru(GRU, X, seq_lengths=jnp.array(lengths))


def test_seq_lengths_not_integer():
    with pytest.raises(TypeError, match=r"seq_lengths has dtype float32; expected integers"):
        jlstm.lstm(LSTM, X, seq_lengths=jnp.array([5.0, 2.0, 1.0], jnp.float32))


def test_seq_lengths_with_unbatched_input():
    with pytest.raises(ValueError, match=r"seq_lengths needs a batched x.*add a batch axis"):
        jlstm.lstm(LSTM, jnp.ones((5, 4)), seq_lengths=jnp.array([3]))


def test_missing_parameter():
    params = {k: v for k, v in LSTM.items() if k != "bias_hh_l1"}
    with pytest.raises(
        ValueError, match=r"missing \['bias_hh_l1'\]; expected exactly \['weight_ih_l0'"
    ):
        jlstm.lstm(params, X)


def test_unexpected_parameter():
    params = {**LSTM, "weight_hr_l7": jnp.zeros((2, 6))}
    with pytest.raises(ValueError, match=r"unexpected \['weight_hr_l7'\].*prefix="):
        jlstm.lstm(params, X)


def test_no_layer_parameters():
    with pytest.raises(
        ValueError, match=r"no 'weight_ih_l0' \(got keys \['w'\]\).*jlstm.init_lstm"
    ):
        jlstm.lstm({"w": jnp.zeros(3)}, X)


def test_params_not_a_dict():
    with pytest.raises(
        TypeError, match=r"params must be a dict .* got list; create one with jlstm.init_\*"
    ):
        jlstm.lstm([LSTM], X)


def test_wrong_parameter_shape():
    params = {**LSTM, "weight_hh_l1": jnp.zeros((24, 5))}
    with pytest.raises(
        ValueError, match=r"weight_hh_l1 has shape \(24, 5\) but .* needs \(24, 6\)"
    ):
        jlstm.lstm(params, X)


def test_gru_params_passed_to_lstm():
    with pytest.raises(
        ValueError,
        match=r"weight_ih_l0 has 18 rows but LSTM needs 4 x hidden_size = 24.*look like GRU parameters: call jlstm.gru",
    ):
        jlstm.lstm(GRU, X)


def test_lstm_params_passed_to_rnn():
    with pytest.raises(
        ValueError,
        match=r"RNN needs 1 x hidden_size = 6.*look like LSTM parameters: call jlstm.lstm",
    ):
        jlstm.rnn(LSTM, X)


def test_proj_params_passed_to_gru():
    params = jlstm.init_lstm(KEY, 4, 6, proj_size=2)
    with pytest.raises(ValueError, match=r"weight_hr_l0 \(proj_size\) exists only for LSTM"):
        jlstm.gru(params, X)


def test_cell_params_passed_to_layer():
    with pytest.raises(ValueError, match=r"look like a cell's .* use jlstm.lstm_cell"):
        jlstm.lstm(jlstm.init_lstm_cell(KEY, 4, 6), X)


def test_layer_params_passed_to_cell():
    with pytest.raises(ValueError, match=r"look like a layer's .* use jlstm.gru for a layer"):
        jlstm.gru_cell(GRU, X[0])


@pytest.mark.parametrize("dropout", [-0.1, 1.0, 1.5, True], ids=str)
def test_dropout_out_of_range(dropout):
    with pytest.raises(ValueError, match=r"dropout must be a float in \[0, 1\), got"):
        jlstm.lstm(LSTM, X, dropout=dropout, key=KEY)


@pytest.mark.parametrize("proj_size", [6, 9])
def test_proj_size_not_below_hidden_size(proj_size):
    with pytest.raises(
        ValueError,
        match=rf"proj_size must be smaller than hidden_size, got proj_size={proj_size} and hidden_size=6",
    ):
        jlstm.init_lstm(KEY, 4, 6, proj_size=proj_size)


@pytest.mark.parametrize(
    "init",
    [jlstm.init_lstm, jlstm.init_gru, jlstm.init_rnn, jlstm.init_lstm_cell],
    ids=lambda f: f.__name__,
)
def test_hidden_size_below_one(init):
    with pytest.raises(ValueError, match=r"hidden_size must be an int >= 1, got 0"):
        init(KEY, 4, 0)


def test_num_layers_below_one():
    with pytest.raises(ValueError, match=r"num_layers must be an int >= 1, got 0"):
        jlstm.init_gru(KEY, 4, 6, num_layers=0)


@pytest.mark.parametrize(
    "call",
    [
        lambda: jlstm.init_rnn(KEY, 4, 6, nonlinearity="sigmoid"),
        lambda: jlstm.rnn(jlstm.init_rnn(KEY, 4, 6), X, nonlinearity="sigmoid"),
        lambda: jlstm.rnn_cell(jlstm.init_rnn_cell(KEY, 4, 6), X[0], nonlinearity="sigmoid"),
    ],
    ids=["init_rnn", "rnn", "rnn_cell"],
)
def test_unknown_nonlinearity(call):
    with pytest.raises(
        ValueError, match=r"unknown nonlinearity 'sigmoid'; expected one of \('tanh', 'relu'\)"
    ):
        call()


def test_cell_wrong_input_size():
    with pytest.raises(
        ValueError, match=r"lstm_cell: x has shape \(3, 5\) but the cell expects \(batch, 4\)"
    ):
        jlstm.lstm_cell(jlstm.init_lstm_cell(KEY, 4, 6), jnp.ones((3, 5)))


def test_cell_state_not_a_pair():
    with pytest.raises(
        ValueError, match=r"lstm_cell: state must be a pair \(h, c\) or None, got tuple of length 3"
    ):
        jlstm.lstm_cell(jlstm.init_lstm_cell(KEY, 4, 6), jnp.ones((3, 4)), (None, None, None))


def test_cell_state_wrong_shape():
    with pytest.raises(
        ValueError, match=r"gru_cell: h has shape \(3, 5\) but x of shape \(3, 4\) needs \(3, 6\)"
    ):
        jlstm.gru_cell(jlstm.init_gru_cell(KEY, 4, 6), jnp.ones((3, 4)), jnp.zeros((3, 5)))


def test_from_torch_foreign_name():
    with pytest.raises(
        ValueError, match=r"'lstm.weight_ih_l0' is not a parameter name.*prefix='<submodule>.'"
    ):
        jlstm.from_torch({"lstm.weight_ih_l0": np.zeros((4, 1))})


def test_from_torch_prefix_matches_nothing():
    with pytest.raises(ValueError, match=r"no keys start with prefix 'rnn.'"):
        jlstm.from_torch({"lstm.weight_ih_l0": np.zeros((4, 1))}, prefix="rnn.")


def test_pad_sequence_mismatched_trailing_shape():
    with pytest.raises(
        ValueError,
        match=r"sequence 1 has shape \(2, 3\) but every sequence must be \(L_i, \*\(4,\)\)",
    ):
        jlstm.pad_sequence([jnp.ones((3, 4)), jnp.ones((2, 3))])


def test_unknown_impl():
    with pytest.raises(
        ValueError,
        match=r"lstm: impl must be one of \('auto', 'native', 'pallas', 'cudnn', 'fused', 'scan'\), "
        r"got 'triton'",
    ):
        jlstm.lstm(LSTM, X, impl="triton")


def test_fused_impl_not_available_for_projection():
    params = jlstm.init_lstm(KEY, 4, 6, proj_size=2)
    with pytest.raises(
        ValueError,
        match=r"lstm: impl='fused' \(lax.scan with the hand-written backward\) cannot run this call: "
        r"it covers LSTM without proj_size and GRU, this is an LSTM with proj_size; use impl='auto'",
    ):
        jlstm.lstm(params, X, impl="fused")


@pytest.mark.parametrize(
    "fn,params,this",
    [
        (jlstm.rnn, jlstm.init_rnn(KEY, 4, 6), "an RNN"),
        (jlstm.lstm, jlstm.init_lstm(KEY, 4, 6, proj_size=2), "an LSTM with proj_size"),
    ],
    ids=["rnn", "proj"],
)
def test_native_impl_covers_lstm_and_gru(fn, params, this):
    with pytest.raises(
        ValueError,
        match=rf"impl='native' \(the C\+\+ CPU loop\) cannot run this call: it covers LSTM without "
        rf"proj_size and GRU, this is {this}; use impl='auto'",
    ):
        fn(params, X, impl="native")


def test_native_impl_needs_float32_or_float64():
    params = jlstm.init_lstm(KEY, 4, 6, dtype=jnp.bfloat16)
    with pytest.raises(
        ValueError,
        match=r"lstm: impl='native' \(the C\+\+ CPU loop\) cannot run this call: it runs float32 or "
        r"float64, this call is bfloat16; use impl='auto'",
    ):
        jlstm.lstm(params, X.astype(jnp.bfloat16), impl="native")


@pytest.mark.parametrize("unroll", [0, 1.5, True], ids=str)
def test_bad_unroll(unroll):
    with pytest.raises(ValueError, match=r"unroll must be an int >= 1 .*got"):
        jlstm.gru(GRU, X, unroll=unroll)


@pytest.mark.parametrize("every", [0, -3, 2.5, True, "16"], ids=str)
def test_bad_checkpoint_every(every):
    with pytest.raises(
        ValueError,
        match=r"checkpoint_every must be None or an int >= 1 .*got .*e\.g\. checkpoint_every=64",
    ):
        jlstm.gru(GRU, X, checkpoint_every=every)
