"""Parameters: torch's names, shapes and default init, and reading a layer's structure back from them.

A parameter set is a flat dict keyed exactly like the torch module's ``state_dict()``:
``weight_ih_l{k}``, ``weight_hh_l{k}``, ``bias_ih_l{k}``, ``bias_hh_l{k}``, ``weight_hr_l{k}`` (LSTM with
``proj_size``), each with a ``_reverse`` twin when bidirectional; cells use ``weight_ih``, ``weight_hh``,
``bias_ih``, ``bias_hh``. All sizes are read back from the arrays, so the layer functions take no size
arguments. Every check of a parameter dict lives here and runs once, at trace time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp

# Rows of weight_ih / weight_hh per hidden unit: LSTM i,f,g,o; GRU r,z,n; RNN one.
GATES = {"lstm": 4, "gru": 3, "rnn": 1}
NONLINEARITIES = ("tanh", "relu")


class Weights(NamedTuple):
    """One direction of one layer (or one cell); biases and projection may be absent."""

    w_ih: jax.Array  # (G*H, input_size)
    w_hh: jax.Array  # (G*H, H_out)
    b_ih: jax.Array | None  # (G*H,)
    b_hh: jax.Array | None  # (G*H,)
    w_hr: jax.Array | None  # (H_out, H), LSTM with proj_size only


class Structure(NamedTuple):
    """What a layer parameter dict describes, read from its names and shapes."""

    input_size: int
    hidden_size: int
    proj_size: int  # 0 when absent
    num_layers: int
    num_directions: int
    layers: tuple[tuple[Weights, ...], ...]  # [layer][direction]

    @property
    def output_size(self) -> int:
        return self.proj_size or self.hidden_size


# --------------------------------------------------------------------------------------------
# init


def _check_size(fn: str, name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(
            f"{fn}: {name} must be an int >= {minimum}, got {value!r}; pass a positive "
            f"integer size such as {name}=32"
        )


def _check_nonlinearity(fn: str, nonlinearity: object) -> None:
    if nonlinearity not in NONLINEARITIES:
        raise ValueError(
            f"{fn}: unknown nonlinearity {nonlinearity!r}; expected one of {NONLINEARITIES} "
            "(torch.nn.RNN accepts the same two)"
        )


def _uniform(key: jax.Array, shapes: dict[str, tuple[int, ...]], hidden_size: int, dtype) -> dict:
    """torch's default init: every tensor ~ U(-1/sqrt(H), 1/sqrt(H)), one key per tensor."""
    bound = 1.0 / math.sqrt(hidden_size)
    keys = jax.random.split(key, len(shapes))
    return {
        name: jax.random.uniform(k, shape, dtype, -bound, bound)
        for k, (name, shape) in zip(keys, shapes.items(), strict=True)
    }


def _cell_shapes(
    gates: int,
    input_size: int,
    hidden_size: int,
    bias: bool,
    suffix: str = "",
    out_size: int | None = None,
    proj_size: int = 0,
) -> dict[str, tuple[int, ...]]:
    out_size = hidden_size if out_size is None else out_size
    shapes = {
        f"weight_ih{suffix}": (gates * hidden_size, input_size),
        f"weight_hh{suffix}": (gates * hidden_size, out_size),
    }
    if bias:
        shapes[f"bias_ih{suffix}"] = (gates * hidden_size,)
        shapes[f"bias_hh{suffix}"] = (gates * hidden_size,)
    if proj_size:
        shapes[f"weight_hr{suffix}"] = (proj_size, hidden_size)
    return shapes


def layer_shapes(
    kind: str,
    input_size: int,
    hidden_size: int,
    num_layers: int,
    *,
    bias: bool,
    bidirectional: bool,
    proj_size: int = 0,
) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a layer's parameters, in torch's ``state_dict`` order."""
    out_size = proj_size or hidden_size
    directions = ("", "_reverse") if bidirectional else ("",)
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in range(num_layers):
        layer_in = input_size if layer == 0 else out_size * len(directions)
        for direction in directions:
            shapes |= _cell_shapes(
                GATES[kind],
                layer_in,
                hidden_size,
                bias,
                f"_l{layer}{direction}",
                out_size,
                proj_size,
            )
    return shapes


def _init_layers(
    fn: str,
    kind: str,
    key: jax.Array,
    input_size: int,
    hidden_size: int,
    num_layers: int,
    bias: bool,
    bidirectional: bool,
    proj_size: int,
    dtype,
) -> dict:
    _check_size(fn, "input_size", input_size, 1)
    _check_size(fn, "hidden_size", hidden_size, 1)
    _check_size(fn, "num_layers", num_layers, 1)
    _check_size(fn, "proj_size", proj_size, 0)
    if proj_size >= hidden_size and proj_size:
        raise ValueError(
            f"{fn}: proj_size must be smaller than hidden_size, got proj_size={proj_size} and "
            f"hidden_size={hidden_size}; use proj_size=0 (no projection) or a value below {hidden_size}"
        )
    shapes = layer_shapes(
        kind,
        input_size,
        hidden_size,
        num_layers,
        bias=bias,
        bidirectional=bidirectional,
        proj_size=proj_size,
    )
    return _uniform(key, shapes, hidden_size, dtype)


def init_lstm(
    key: jax.Array,
    input_size: int,
    hidden_size: int,
    num_layers: int = 1,
    *,
    bias: bool = True,
    bidirectional: bool = False,
    proj_size: int = 0,
    dtype=jnp.float32,
) -> dict[str, jax.Array]:
    """Parameters of ``torch.nn.LSTM(input_size, hidden_size, num_layers, bias=..., bidirectional=...,
    proj_size=...)``, with torch's names, shapes and init U(-1/sqrt(H), 1/sqrt(H)).

    >>> import jax, jlstm
    >>> params = jlstm.init_lstm(jax.random.key(0), 28, 64, num_layers=2)
    >>> params["weight_ih_l0"].shape, params["weight_hh_l1"].shape
    ((256, 28), (256, 64))
    """
    return _init_layers(
        "init_lstm",
        "lstm",
        key,
        input_size,
        hidden_size,
        num_layers,
        bias,
        bidirectional,
        proj_size,
        dtype,
    )


def init_gru(
    key: jax.Array,
    input_size: int,
    hidden_size: int,
    num_layers: int = 1,
    *,
    bias: bool = True,
    bidirectional: bool = False,
    dtype=jnp.float32,
) -> dict[str, jax.Array]:
    """Parameters of ``torch.nn.GRU`` (gate rows r, z, n), torch's names, shapes and init.

    >>> import jax, jlstm
    >>> jlstm.init_gru(jax.random.key(0), 10, 20)["weight_ih_l0"].shape
    (60, 10)
    """
    return _init_layers(
        "init_gru", "gru", key, input_size, hidden_size, num_layers, bias, bidirectional, 0, dtype
    )


def init_rnn(
    key: jax.Array,
    input_size: int,
    hidden_size: int,
    num_layers: int = 1,
    *,
    nonlinearity: str = "tanh",
    bias: bool = True,
    bidirectional: bool = False,
    dtype=jnp.float32,
) -> dict[str, jax.Array]:
    """Parameters of ``torch.nn.RNN``; ``nonlinearity`` is checked here but, as in torch's
    ``state_dict``, not stored: pass it to :func:`jlstm.rnn` too.

    >>> import jax, jlstm
    >>> sorted(jlstm.init_rnn(jax.random.key(0), 3, 5, bias=False))
    ['weight_hh_l0', 'weight_ih_l0']
    """
    _check_nonlinearity("init_rnn", nonlinearity)
    return _init_layers(
        "init_rnn", "rnn", key, input_size, hidden_size, num_layers, bias, bidirectional, 0, dtype
    )


def _init_cell(fn: str, kind: str, key, input_size, hidden_size, bias, dtype) -> dict:
    _check_size(fn, "input_size", input_size, 1)
    _check_size(fn, "hidden_size", hidden_size, 1)
    return _uniform(
        key, _cell_shapes(GATES[kind], input_size, hidden_size, bias), hidden_size, dtype
    )


def init_lstm_cell(
    key: jax.Array, input_size: int, hidden_size: int, *, bias: bool = True, dtype=jnp.float32
) -> dict[str, jax.Array]:
    """Parameters of ``torch.nn.LSTMCell``: ``weight_ih (4H, I)``, ``weight_hh (4H, H)``, biases ``(4H,)``."""
    return _init_cell("init_lstm_cell", "lstm", key, input_size, hidden_size, bias, dtype)


def init_gru_cell(
    key: jax.Array, input_size: int, hidden_size: int, *, bias: bool = True, dtype=jnp.float32
) -> dict[str, jax.Array]:
    """Parameters of ``torch.nn.GRUCell``: ``weight_ih (3H, I)``, ``weight_hh (3H, H)``, biases ``(3H,)``."""
    return _init_cell("init_gru_cell", "gru", key, input_size, hidden_size, bias, dtype)


def init_rnn_cell(
    key: jax.Array,
    input_size: int,
    hidden_size: int,
    *,
    nonlinearity: str = "tanh",
    bias: bool = True,
    dtype=jnp.float32,
) -> dict[str, jax.Array]:
    """Parameters of ``torch.nn.RNNCell``: ``weight_ih (H, I)``, ``weight_hh (H, H)``, biases ``(H,)``."""
    _check_nonlinearity("init_rnn_cell", nonlinearity)
    return _init_cell("init_rnn_cell", "rnn", key, input_size, hidden_size, bias, dtype)


# --------------------------------------------------------------------------------------------
# reading structure back, with every check in one place


def _guess_kind(rows: int, hidden_size: int) -> str | None:
    for kind, gates in GATES.items():
        if rows == gates * hidden_size:
            return kind
    return None


def _check_mapping(fn: str, params: object) -> None:
    if not isinstance(params, Mapping):
        raise TypeError(
            f"{fn}: params must be a dict of arrays keyed like torch's state_dict, got "
            f"{type(params).__name__}; create one with jlstm.init_* or jlstm.from_torch(module.state_dict())"
        )


def _check_names(fn: str, params: Mapping, expected: Mapping, what: str) -> None:
    missing = [n for n in expected if n not in params]
    unexpected = sorted(n for n in params if n not in expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if unexpected:
            parts.append(f"unexpected {unexpected}")
        raise ValueError(
            f"{fn}: params do not describe {what}: {'; '.join(parts)}; expected exactly "
            f"{list(expected)} (torch's state_dict names; a module's full state_dict can be narrowed "
            "with jlstm.from_torch(sd, prefix='lstm.'))"
        )


def _check_shapes(fn: str, params: Mapping, expected: Mapping, what: str) -> None:
    for name, shape in expected.items():
        got = tuple(jnp.shape(params[name]))
        if got != shape:
            raise ValueError(
                f"{fn}: {name} has shape {got} but {what} needs {shape}; all parameters must come "
                "from one module (jlstm.init_* or jlstm.from_torch)"
            )
        dtype = jnp.result_type(params[name])
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"{fn}: {name} has dtype {dtype}; parameters must be floating point")


def _hidden_and_proj(fn: str, kind: str, params: Mapping, suffix: str) -> tuple[int, int, int]:
    """(hidden_size, proj_size, input_size) read from the first layer's arrays, with the gate check."""
    for name in (f"weight_ih{suffix}", f"weight_hh{suffix}"):
        if jnp.ndim(params[name]) != 2:
            raise ValueError(
                f"{fn}: {name} must be 2-D, got shape {tuple(jnp.shape(params[name]))}"
            )
    rows, input_size = jnp.shape(params[f"weight_ih{suffix}"])
    w_hr = params.get(f"weight_hr{suffix}")
    if w_hr is not None:
        if jnp.ndim(w_hr) != 2:
            raise ValueError(f"{fn}: weight_hr{suffix} must be 2-D, got shape {jnp.shape(w_hr)}")
        proj_size, hidden_size = jnp.shape(w_hr)
    else:
        proj_size, hidden_size = 0, jnp.shape(params[f"weight_hh{suffix}"])[1]
    if rows != GATES[kind] * hidden_size:
        guess = _guess_kind(rows, hidden_size)
        hint = (
            f"these look like {guess.upper()} parameters: call jlstm.{guess}"
            if guess and guess != kind
            else "the parameters are inconsistent"
        )
        raise ValueError(
            f"{fn}: weight_ih{suffix} has {rows} rows but {kind.upper()} needs {GATES[kind]} x "
            f"hidden_size = {GATES[kind] * hidden_size} ({GATES[kind]} gates); {hint}"
        )
    return hidden_size, proj_size, input_size


def _weights(params: Mapping, suffix: str) -> Weights:
    return Weights(
        *(
            params.get(f"{n}{suffix}")
            for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")
        )
    )


def layer_structure(fn: str, kind: str, params: object) -> Structure:
    """Check a layer parameter dict (names, gate count, shapes) and return its structure."""
    _check_mapping(fn, params)
    if "weight_ih_l0" not in params:
        if "weight_ih" in params:
            raise ValueError(
                f"{fn}: params look like a cell's (weight_ih, weight_hh, ...), but a layer needs "
                f"weight_ih_l0, weight_hh_l0, ...; use jlstm.{kind}_cell for a cell or jlstm.init_{kind} "
                "for a layer"
            )
        raise ValueError(
            f"{fn}: params have no 'weight_ih_l0' (got keys {sorted(params)}); expected torch's "
            f"state_dict names such as weight_ih_l0, weight_hh_l0, bias_ih_l0, bias_hh_l0: create "
            f"them with jlstm.init_{kind} or jlstm.from_torch(module.state_dict())"
        )
    if "weight_hh_l0" not in params:
        raise ValueError(f"{fn}: params have weight_ih_l0 but no weight_hh_l0; expected both")
    num_layers = 1
    while f"weight_ih_l{num_layers}" in params:
        num_layers += 1
    bidirectional = "weight_ih_l0_reverse" in params
    bias = "bias_ih_l0" in params
    if "weight_hr_l0" in params and kind != "lstm":
        raise ValueError(f"{fn}: weight_hr_l0 (proj_size) exists only for LSTM; call jlstm.lstm")
    hidden_size, proj_size, input_size = _hidden_and_proj(fn, kind, params, "_l0")
    what = (
        f"a {num_layers}-layer {'bidirectional ' if bidirectional else ''}{kind.upper()} "
        f"(input_size={input_size}, hidden_size={hidden_size}"
        f"{f', proj_size={proj_size}' if proj_size else ''}, bias={bias})"
    )
    expected = layer_shapes(
        kind,
        input_size,
        hidden_size,
        num_layers,
        bias=bias,
        bidirectional=bidirectional,
        proj_size=proj_size,
    )
    _check_names(fn, params, expected, what)
    _check_shapes(fn, params, expected, what)
    directions = ("", "_reverse") if bidirectional else ("",)
    layers = tuple(
        tuple(_weights(params, f"_l{k}{d}") for d in directions) for k in range(num_layers)
    )
    return Structure(input_size, hidden_size, proj_size, num_layers, len(directions), layers)


def cell_weights(fn: str, kind: str, params: object) -> Weights:
    """Check a cell parameter dict and return its weights."""
    _check_mapping(fn, params)
    if "weight_ih" not in params or "weight_hh" not in params:
        if "weight_ih_l0" in params:
            raise ValueError(
                f"{fn}: params look like a layer's (weight_ih_l0, ...), but a cell needs weight_ih, "
                f"weight_hh, bias_ih, bias_hh; use jlstm.{kind} for a layer or jlstm.init_{kind}_cell"
            )
        raise ValueError(
            f"{fn}: params need 'weight_ih' and 'weight_hh' (got keys {sorted(params)}); create them "
            f"with jlstm.init_{kind}_cell or jlstm.from_torch(cell.state_dict())"
        )
    hidden_size, _, input_size = _hidden_and_proj(fn, kind, params, "")
    bias = "bias_ih" in params
    expected = _cell_shapes(GATES[kind], input_size, hidden_size, bias)
    what = (
        f"a {kind.upper()} cell (input_size={input_size}, hidden_size={hidden_size}, bias={bias})"
    )
    _check_names(fn, params, expected, what)
    _check_shapes(fn, params, expected, what)
    return _weights(params, "")
