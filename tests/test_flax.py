"""jlstm.nn (Flax NNX) and jlstm.linen: equal to the functional API and to torch, torch state dicts
in and out, dropout by train/eval mode, and training inside an optax loop."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from trees import assert_trees_close

import jlstm

pytest.importorskip("flax")
optax = pytest.importorskip("optax")

from flax import linen, nnx  # noqa: E402

from jlstm import linen as jlinen  # noqa: E402
from jlstm import nn as jnn  # noqa: E402

# kind -> (NNX class, Linen class, functional, extra constructor/call options)
KINDS = {
    "lstm": (jnn.LSTM, jlinen.LSTM, jlstm.lstm, {}),
    "gru": (jnn.GRU, jlinen.GRU, jlstm.gru, {}),
    "rnn_tanh": (jnn.RNN, jlinen.RNN, jlstm.rnn, {"nonlinearity": "tanh"}),
    "rnn_relu": (jnn.RNN, jlinen.RNN, jlstm.rnn, {"nonlinearity": "relu"}),
}
L, N, IN, H = 5, 3, 4, 3  # seq_len, batch, input_size, hidden_size
LENGTHS = np.array([5, 1, 3])
# (kind, constructor options, use seq_lengths)
LAYER_CASES = [
    *[(kind, {}, False) for kind in KINDS],
    *[(kind, dict(num_layers=2, bidirectional=True, batch_first=True), True) for kind in KINDS],
    ("lstm", dict(num_layers=2, bidirectional=True, proj_size=2), True),
    ("lstm", dict(proj_size=1, bias=False, batch_first=True), False),
    ("gru", dict(num_layers=3, bias=False), True),
]


def case_id(case) -> str:
    kind, options, lengths = case
    return "-".join([kind, *(f"{k}={v}" for k, v in options.items()), *(["lengths"] * lengths)])


def x_for(options, rng) -> np.ndarray:
    shape = (N, L, IN) if options.get("batch_first") else (L, N, IN)
    return rng.standard_normal(shape)


def functional_options(kind, module) -> dict:
    extra = {"nonlinearity": module.nonlinearity} if kind.startswith("rnn") else {}
    return dict(batch_first=module.batch_first, **extra)


# --------------------------------------------------------------------------------------------
# torch helpers


def torch_layer(torch, kind, module):
    """The torch layer with `module`'s options, loaded through jlstm.to_torch (the saving path)."""
    kw = dict(
        num_layers=module.num_layers,
        bias=module.bias,
        batch_first=module.batch_first,
        dropout=module.dropout,
        bidirectional=module.bidirectional,
    )
    if kind == "lstm":
        layer = torch.nn.LSTM(
            module.input_size, module.hidden_size, proj_size=module.proj_size, **kw
        )
    elif kind == "gru":
        layer = torch.nn.GRU(module.input_size, module.hidden_size, **kw)
    else:
        layer = torch.nn.RNN(
            module.input_size, module.hidden_size, nonlinearity=module.nonlinearity, **kw
        )
    state_dict = jlstm.to_torch(module.state_dict())
    layer = layer.double()
    layer.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()})
    return layer


def torch_forward(torch, layer, x, lengths=None):
    """torch's output and final state(s) as numpy, through packed sequences when `lengths` is given."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    xt = torch.from_numpy(np.asarray(x))
    if lengths is not None:
        xt = pack_padded_sequence(
            xt, torch.as_tensor(lengths), batch_first=layer.batch_first, enforce_sorted=False
        )
    with torch.no_grad():
        output, final = layer(xt)
    if lengths is not None:
        output, _ = pad_packed_sequence(output, batch_first=layer.batch_first, total_length=L)
    return jax.tree.map(lambda t: t.numpy(), (output, final))


# --------------------------------------------------------------------------------------------
# NNX and Linen layers: parity with the functional API and torch
#
# Every forward pass runs under jit: an eager call of a scan compiles it again each time.


@pytest.mark.parametrize("case", LAYER_CASES, ids=case_id)
def test_layer_parity(case, torch):
    kind, options, use_lengths = case
    nnx_cls, linen_cls, fn, extra = KINDS[kind]
    x = x_for(options, np.random.default_rng(0))
    lengths = LENGTHS if use_lengths else None
    module = nnx_cls(IN, H, dtype=jnp.float64, rngs=nnx.Rngs(0), **options, **extra)
    model = linen_cls(H, dtype=jnp.float64, **options, **extra)
    variables = jax.eval_shape(model.init, jax.random.key(1), x, seq_lengths=lengths)
    assert jax.tree.map(jnp.shape, variables["params"]) == jax.tree.map(
        jnp.shape, module.state_dict()
    )

    @nnx.jit
    def forward(module, x, lengths):
        params = module.state_dict()
        return (
            module(x, seq_lengths=lengths),
            fn(params, x, seq_lengths=lengths, **functional_options(kind, module)),
            model.apply({"params": params}, x, seq_lengths=lengths),
        )

    got, functional, linen_got = forward(module, x, lengths)
    assert_trees_close(got, functional, rtol=0, atol=0)
    assert_trees_close(linen_got, functional, rtol=0, atol=0)
    assert_trees_close(
        got,
        torch_forward(torch, torch_layer(torch, kind, module), x, lengths),
        rtol=1e-10,
        atol=1e-12,
    )


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_nnx_gradients_match_torch(kind, torch):
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    nnx_cls, _, _, extra = KINDS[kind]
    options = dict(num_layers=2, bidirectional=True, **({"proj_size": 2} if kind == "lstm" else {}))
    module = nnx_cls(IN, H, dtype=jnp.float64, rngs=nnx.Rngs(0), **options, **extra)
    x = x_for(options, np.random.default_rng(1))

    @nnx.jit
    @nnx.grad
    def grads(module):
        output, final = module(x, seq_lengths=LENGTHS)
        return jnp.sum(output**2) + sum(jnp.sum(s) for s in jax.tree.leaves(final))

    got = grads(module)
    layer = torch_layer(torch, kind, module)
    packed = pack_padded_sequence(
        torch.from_numpy(x), torch.as_tensor(LENGTHS), enforce_sorted=False
    )
    output, final = layer(packed)
    output, _ = pad_packed_sequence(output, total_length=L)
    finals = final if kind == "lstm" else (final,)
    ((output**2).sum() + sum(s.sum() for s in finals)).backward()
    for name, p in layer.named_parameters():
        np.testing.assert_allclose(got[name][...], p.grad.numpy(), rtol=1e-9, atol=1e-12)


def test_nnx_attributes_and_default_init():
    lstm = jnn.LSTM(IN, H, 2, bidirectional=True, proj_size=2, rngs=nnx.Rngs(0))
    assert (lstm.input_size, lstm.hidden_size, lstm.num_layers, lstm.proj_size) == (IN, H, 2, 2)
    assert isinstance(lstm.weight_ih_l1_reverse, nnx.Param)
    params = lstm.state_dict()
    expected = jlstm.init_lstm(jax.random.key(0), IN, H, 2, bidirectional=True, proj_size=2)
    assert list(params) == list(expected)
    for name, value in params.items():
        assert value.dtype == jnp.float32 and value.shape == expected[name].shape, name
        assert jnp.all(jnp.abs(value) <= 1 / np.sqrt(H)), name
    # NNX's own view of the state uses the same names.
    assert set(nnx.state(lstm, nnx.Param).keys()) == set(params)


# --------------------------------------------------------------------------------------------
# cells


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh", "rnn_relu"])
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
def test_cell_parity(kind, batched, torch):
    base = kind.split("_")[0]
    extra = {"nonlinearity": kind.split("_")[1]} if base == "rnn" else {}
    cls = {"lstm": jnn.LSTMCell, "gru": jnn.GRUCell, "rnn": jnn.RNNCell}[base]
    fn = {"lstm": jlstm.lstm_cell, "gru": jlstm.gru_cell, "rnn": jlstm.rnn_cell}[base]
    cell = cls(IN, H, dtype=jnp.float64, rngs=nnx.Rngs(0), **extra)
    rng = np.random.default_rng(2)
    n = (N,) if batched else ()
    x = rng.standard_normal((*n, IN))
    h = rng.standard_normal((*n, H))
    state = (h, rng.standard_normal((*n, H))) if base == "lstm" else h

    got = cell(x, state)
    assert_trees_close(got, fn(cell.state_dict(), x, state, **extra), rtol=0, atol=0)
    assert_trees_close(cell(x), fn(cell.state_dict(), x, **extra), rtol=0, atol=0)

    torch_cls = {"lstm": torch.nn.LSTMCell, "gru": torch.nn.GRUCell, "rnn": torch.nn.RNNCell}[base]
    torch_cell = torch_cls(IN, H, **extra).double()
    cell.load_state_dict(jlstm.from_torch(torch_cell.state_dict()))
    with torch.no_grad():
        expected = torch_cell(torch.from_numpy(x), jax.tree.map(torch.from_numpy, state))
    assert_trees_close(
        cell(x, state), jax.tree.map(lambda t: t.numpy(), expected), rtol=1e-10, atol=1e-12
    )


# --------------------------------------------------------------------------------------------
# torch state dicts in and out


@pytest.mark.parametrize("kind", list(KINDS))
def test_state_dict_round_trip(kind, torch):
    nnx_cls, linen_cls, fn, extra = KINDS[kind]
    options = dict(num_layers=2, bidirectional=True, **({"proj_size": 2} if kind == "lstm" else {}))
    torch.manual_seed(0)
    if kind == "lstm":
        layer = torch.nn.LSTM(IN, H, **options)
    elif kind == "gru":
        layer = torch.nn.GRU(IN, H, **options)
    else:
        layer = torch.nn.RNN(IN, H, **options, **extra)
    module = nnx_cls(IN, H, rngs=nnx.Rngs(0), **options, **extra)
    module.load_state_dict(jlstm.from_torch(layer.state_dict()))  # torch -> NNX
    for name, tensor in layer.state_dict().items():
        np.testing.assert_array_equal(module.state_dict()[name], tensor.numpy())

    module2 = nnx_cls(IN, H, rngs=nnx.Rngs(1), **options, **extra)
    torch_layer = type(layer)(IN, H, **options, **extra)
    torch_layer.load_state_dict(  # NNX -> torch -> NNX
        {k: torch.from_numpy(v) for k, v in jlstm.to_torch(module.state_dict()).items()}
    )
    module2.load_state_dict(jlstm.from_torch(torch_layer.state_dict()))
    assert_trees_close(module2.state_dict(), module.state_dict(), rtol=0, atol=0)

    # Linen: the params collection is the same dict.
    model = linen_cls(H, **options, **extra)
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((L, N, IN)))
    assert jax.tree.map(jnp.shape, variables["params"]) == jax.tree.map(
        jnp.shape, jlstm.from_torch(layer.state_dict())
    )


def test_load_state_dict_errors():
    lstm = jnn.LSTM(IN, H, 2, rngs=nnx.Rngs(0))
    params = lstm.state_dict()
    with pytest.raises(ValueError, match=r"missing keys \['weight_hh_l1'\], unexpected keys \[\]"):
        lstm.load_state_dict({k: v for k, v in params.items() if k != "weight_hh_l1"})
    with pytest.raises(ValueError, match=r"unexpected keys \['weight_hr_l0'\]"):
        lstm.load_state_dict({**params, "weight_hr_l0": jnp.zeros((2, H))})
    with pytest.raises(
        ValueError, match=r"weight_ih_l0 has shape \(12, 5\) but the module's is \(12, 4\)"
    ):
        lstm.load_state_dict({**params, "weight_ih_l0": jnp.zeros((4 * H, IN + 1))})
    # A failed load leaves the module unchanged; a good one casts to the parameter dtype.
    assert_trees_close(lstm.state_dict(), params, rtol=0, atol=0)
    lstm.load_state_dict({k: np.zeros(v.shape, np.float64) for k, v in params.items()})
    assert lstm.weight_ih_l0[...].dtype == jnp.float32 and not jnp.any(lstm.weight_ih_l0[...])


# --------------------------------------------------------------------------------------------
# dropout: on in training mode, off in eval mode


@nnx.jit(static_argnames="fn")
def dropout_outputs(module, x, key, fn):
    """Every way of calling `module`, in one compiled program, next to the functional calls."""
    params, options = module.state_dict(), functional_options(fn.__name__, module)
    return {
        "call": module(x),
        "call_again": module(x),
        "keyed": module(x, rngs=key),
        "rngs": module(x, rngs=nnx.Rngs(dropout=key)),
        "functional_rngs": fn(
            params, x, dropout=module.dropout, key=nnx.Rngs(dropout=key).dropout(), **options
        ),
        "deterministic": module(x, deterministic=True),
        "stochastic": module(x, deterministic=False),
        "functional_keyed": fn(params, x, dropout=module.dropout, key=key, **options),
        "functional": fn(params, x, **options),
    }


@pytest.mark.parametrize("kind", ["lstm", "rnn_relu"])
def test_nnx_dropout_train_eval(kind, torch):
    nnx_cls, _, fn, extra = KINDS[kind]
    module = nnx_cls(IN, H, 2, dropout=0.5, dtype=jnp.float64, rngs=nnx.Rngs(0), **extra)
    x = x_for({}, np.random.default_rng(3))
    key = jax.random.key(7)

    def differ(a, b):
        return not np.allclose(a[0], b[0])

    assert not module.deterministic  # training mode by default, as in torch
    out = dropout_outputs(module, x, key, fn)
    assert differ(out["call"], out["functional"])
    assert differ(out["call"], out["call_again"])  # the 'dropout' stream advances
    assert differ(out["call"], dropout_outputs(module, x, key, fn)["call"])  # across calls too
    assert_trees_close(out["keyed"], out["functional_keyed"], rtol=0, atol=0)
    assert_trees_close(out["rngs"], out["functional_rngs"], rtol=0, atol=0)
    assert_trees_close(out["deterministic"], out["functional"], rtol=0, atol=0)

    module.eval()
    out = dropout_outputs(module, x, key, fn)
    assert_trees_close(out["call"], out["functional"], rtol=0, atol=0)
    assert_trees_close(out["call_again"], out["functional"], rtol=0, atol=0)
    assert differ(out["stochastic"], out["functional"])
    torch_eval = torch_forward(torch, torch_layer(torch, kind, module).eval(), x)
    assert_trees_close(out["call"], torch_eval, rtol=1e-10, atol=1e-12)

    module.train()
    assert not module.deterministic
    assert nnx.view(module, deterministic=True).deterministic and not module.deterministic


@pytest.mark.parametrize("kind", ["gru", "rnn_tanh"])
def test_linen_dropout(kind):
    nnx_cls, linen_cls, fn, extra = KINDS[kind]
    model = linen_cls(H, num_layers=2, dropout=0.5, **extra)
    fixed = linen_cls(H, num_layers=2, dropout=0.5, deterministic=True, **extra)
    x = jnp.asarray(x_for({}, np.random.default_rng(4)), jnp.float32)
    variables = {"params": nnx_cls(IN, H, 2, rngs=nnx.Rngs(0), **extra).state_dict()}

    @jax.jit
    def outputs(variables, x):
        keys = [{"dropout": jax.random.key(i)} for i in (1, 1, 2)]
        return {
            "eval": model.apply(variables, x, deterministic=True),
            "fixed": fixed.apply(variables, x),
            "train": [model.apply(variables, x, deterministic=False, rngs=k) for k in keys],
            "functional": fn(variables["params"], x, **extra),
        }

    out = outputs(variables, x)
    assert_trees_close(out["eval"], out["functional"], rtol=0, atol=0)
    assert_trees_close(out["fixed"], out["functional"], rtol=0, atol=0)
    train, again, other = out["train"]
    assert not np.allclose(train[0], out["functional"][0])
    assert_trees_close(train, again, rtol=0, atol=0)
    assert not np.allclose(train[0], other[0])
    with pytest.raises(ValueError, match='"deterministic" must be passed'):
        jax.eval_shape(model.apply, variables, x)


def test_dropout_errors():
    with pytest.raises(ValueError, match=r"LSTM: dropout must be a number in \[0, 1\)"):
        jnn.LSTM(IN, H, 2, dropout=1.5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="GRU: dropout > 0 needs a 'dropout'"):
        jnn.GRU(IN, H, 2, dropout=0.5, rngs=nnx.Rngs(params=0))
    with pytest.warns(UserWarning, match="no effect with num_layers=1"):
        jnn.RNN(IN, H, dropout=0.5, rngs=nnx.Rngs(0))
    jnn.GRU(IN, H, 2, rngs=nnx.Rngs(params=0))  # no dropout: no 'dropout' stream needed


# --------------------------------------------------------------------------------------------
# training, nnx.split / nnx.jit


class Regressor(nnx.Module):
    """Recurrent layer -> last step -> linear; a model as a user would write one."""

    def __init__(self, layer_cls, *, rngs, **options):
        self.rnn = layer_cls(2, 8, batch_first=True, rngs=rngs, **options)
        self.head = nnx.Linear(8, 1, rngs=rngs)

    def __call__(self, x):
        output, _ = self.rnn(x)
        return self.head(output[:, -1])[:, 0]


def regression_data():
    """Target: the sum of the first feature over time, a task that needs memory."""
    x = jax.random.normal(jax.random.key(0), (32, 6, 2), jnp.float32)
    return x, x[:, :, 0].sum(axis=1)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
def test_nnx_trains_with_optax(kind):
    nnx_cls, _, _, extra = KINDS[kind]
    model = Regressor(nnx_cls, rngs=nnx.Rngs(0), **extra)
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    x, y = regression_data()

    @nnx.jit
    def train_step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(train_step(model, optimizer, x, y)) for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0], losses

    # split/merge: the pure-JAX view of the same model, with torch names in the state.
    model.eval()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    assert "weight_hh_l0" in params["rnn"]

    @jax.jit
    def predict(params, rest, x):
        return nnx.merge(graphdef, params, rest)(x)

    np.testing.assert_allclose(
        predict(params, rest, x), nnx.jit(lambda m, x: m(x))(model, x), rtol=1e-6
    )


# GRU and RNN go through the same Linen plumbing (params, dropout RNG), tested above.
@pytest.mark.parametrize("kind", ["lstm"])
def test_linen_trains_with_optax(kind):
    _, linen_cls, _, extra = KINDS[kind]

    class Regressor(linen.Module):
        @linen.compact
        def __call__(self, x, *, deterministic):
            output, _ = linen_cls(8, num_layers=2, dropout=0.1, batch_first=True, **extra)(
                x, deterministic=deterministic
            )
            return linen.Dense(1)(output[:, -1])[:, 0]

    model = Regressor()
    x, y = regression_data()
    params = model.init(jax.random.key(0), x, deterministic=True)["params"]
    tx = optax.adam(1e-2)
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, opt_state, key):
        def loss_fn(params):
            pred = model.apply({"params": params}, x, deterministic=False, rngs={"dropout": key})
            return jnp.mean((pred - y) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for key in jax.random.split(jax.random.key(1), 30):
        params, opt_state, loss = train_step(params, opt_state, key)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], losses
    assert set(jlstm.to_torch(params[linen_cls.__name__ + "_0"])) >= {
        "weight_ih_l0",
        "weight_hh_l1",
    }


def _knob_modules(kind, **knobs):
    """(NNX module, Linen module and its variables) of ``kind`` with ``knobs``, same weights."""
    cls = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}[kind]
    nnx_module = getattr(jnn, cls)(3, 4, num_layers=2, rngs=nnx.Rngs(0), **knobs)
    linen_module = getattr(jlinen, cls)(4, num_layers=2, **knobs)
    return nnx_module, linen_module, {"params": nnx_module.state_dict()}


KNOB_X = jnp.linspace(-1.0, 1.0, 5 * 2 * 3).reshape(5, 2, 3)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize(
    "knobs,match",
    [
        ({"impl": "triton"}, r"impl must be one of \('auto', 'native'.*got 'triton'"),
        ({"unroll": 0}, r"unroll must be an int >= 1 \(time steps per loop iteration\), got 0"),
        ({"checkpoint_every": 0}, r"checkpoint_every must be None or an int >= 1 .*got 0"),
    ],
    ids=["impl", "unroll", "checkpoint_every"],
)
def test_modules_pass_each_knob_through(kind, knobs, match):
    """A bad value of each knob reaches jlstm's own check, from both Flax APIs."""
    nnx_module, linen_module, variables = _knob_modules(kind, **knobs)
    with pytest.raises(ValueError, match=rf"{kind}: {match}"):
        nnx_module(KNOB_X)
    with pytest.raises(ValueError, match=rf"{kind}: {match}"):
        linen_module.apply(variables, KNOB_X)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_modules_honour_impl_unroll_and_checkpoint_every(kind):
    """Same numbers with every knob set; impl="scan" takes the C++ loop out of the lowered program
    and checkpoint_every puts recomputed segments (``jax.checkpoint``, "remat") into the jaxpr."""
    for knobs, native in (
        ({}, True),
        ({"impl": "scan", "unroll": 2, "checkpoint_every": 2}, False),
    ):
        nnx_module, linen_module, variables = _knob_modules(kind, **knobs)
        want = jlstm.lstm if kind == "lstm" else jlstm.gru
        want = want(variables["params"], KNOB_X, impl="scan")[0]
        np.testing.assert_allclose(nnx_module(KNOB_X)[0], want, rtol=1e-6, atol=1e-6)
        got = linen_module.apply(variables, KNOB_X)[0]
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)

        def loss(v, m=linen_module):
            return jnp.sum(m.apply(v, KNOB_X)[0])

        assert ("jlstm_" in jax.jit(loss).lower(variables).as_text()) == native
        assert ("remat" in str(jax.make_jaxpr(loss)(variables))) != native  # jax.checkpoint
        graph, state = nnx.split(nnx_module)
        forward = jax.jit(lambda s, g=graph: nnx.merge(g, s)(KNOB_X)[0])
        assert ("jlstm_" in forward.lower(state).as_text()) == native
