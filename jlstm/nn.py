"""Flax NNX modules with torch's constructor, call and parameter names.

``LSTM``, ``GRU`` and ``RNN`` mirror ``torch.nn.LSTM/GRU/RNN``; ``LSTMCell``, ``GRUCell`` and ``RNNCell``
mirror the torch cells. They hold parameters and call the pure functions of :mod:`jlstm`; there is
no maths here.

Parameters are attributes named exactly like torch's (``lstm.weight_ih_l0``, ``lstm.bias_hh_l1_reverse``,
``cell.weight_ih``), each an ``nnx.Param``. ``module.state_dict()`` returns them as the flat dict the
functional API takes, and ``module.load_state_dict(params)`` writes one back (shapes checked), so::

    lstm.load_state_dict(jlstm.from_torch(torch_lstm.state_dict()))   # torch -> jlstm
    torch_lstm.load_state_dict(                                         # jlstm -> torch
        {k: torch.from_numpy(v) for k, v in jlstm.to_torch(lstm.state_dict()).items()})

Dropout (between stacked layers, as in torch) follows NNX's train/eval switch: modules start in
training mode like torch's; ``model.eval()`` or ``nnx.view(model, deterministic=True)`` turns it off,
``model.train()`` back on. Masks draw from the ``rngs`` ``'dropout'`` stream (or ``'default'``).

This module imports Flax; the core package does not, so use ``from jlstm import nn``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

import jlstm

__all__ = ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell"]

_KeySource = nnx.Rngs | nnx.RngStream | jax.Array | None


class _TorchParams(nnx.Module):
    """Stores a torch-named flat parameter dict as ``nnx.Param`` attributes of the same names."""

    def _set_params(self, params: Mapping[str, jax.Array]) -> None:
        self._param_names = tuple(params)
        for name, value in params.items():
            setattr(self, name, nnx.Param(value))

    def state_dict(self) -> dict[str, jax.Array]:
        """The parameters as a flat dict keyed like torch's ``state_dict()``.

        This is the ``params`` argument of the matching :mod:`jlstm` function, and
        ``jlstm.to_torch(module.state_dict())`` loads into the torch module.
        """
        return {name: getattr(self, name)[...] for name in self._param_names}

    def load_state_dict(self, state_dict: Mapping[str, jax.Array]) -> None:
        """Replaces the parameters with ``state_dict`` (e.g. ``jlstm.from_torch(m.state_dict())``).

        Like torch's strict loading: the names must match exactly and every shape must agree;
        values are cast to the module's parameter dtype. A checkpoint file is read by
        ``jlstm.load_torch``, as torch reads it by ``torch.load``:
        ``lstm.load_state_dict(jlstm.load_torch("model.pt", prefix="lstm."))``.
        """
        cls = type(self).__name__
        if not isinstance(state_dict, Mapping):
            raise TypeError(
                f"{cls}.load_state_dict: expected a mapping of parameter names to arrays, got "
                f"{type(state_dict).__name__}; read a file with jlstm.load_torch(path, prefix=...)"
            )
        missing = [n for n in self._param_names if n not in state_dict]
        unexpected = [n for n in state_dict if n not in self._param_names]
        if missing or unexpected:
            raise ValueError(
                f"{cls}.load_state_dict: missing keys {missing}, unexpected keys {unexpected}; "
                f"the module expects exactly {list(self._param_names)} (check num_layers, bias, "
                "bidirectional and proj_size against the module that saved the state dict)"
            )
        new = {}
        for name in self._param_names:
            param = getattr(self, name)
            value = jnp.asarray(state_dict[name], dtype=param[...].dtype)
            if value.shape != param[...].shape:
                raise ValueError(
                    f"{cls}.load_state_dict: {name} has shape {value.shape} but the module's is "
                    f"{param[...].shape}; check input_size, hidden_size and proj_size"
                )
            new[name] = value
        for name, value in new.items():
            getattr(self, name).set_value(value)


class _Layer(_TorchParams):
    """Shared by LSTM, GRU and RNN: torch's layer options and the dropout switch."""

    def __init__(
        self,
        params: Mapping[str, jax.Array],
        *,
        input_size: int,
        hidden_size: int,
        num_layers: int,
        bias: bool,
        batch_first: bool,
        dropout: float,
        bidirectional: bool,
        impl: str = "auto",
        unroll: int = 1,
        checkpoint_every: int | None = None,
        rngs: nnx.Rngs,
    ):
        name = type(self).__name__
        if (
            isinstance(dropout, bool)
            or not isinstance(dropout, int | float)
            or not 0 <= dropout < 1
        ):
            raise ValueError(
                f"{name}: dropout must be a number in [0, 1) (the probability of zeroing an "
                f"element), got {dropout!r}"
            )
        if dropout > 0 and num_layers == 1:
            # torch warns the same way: dropout only acts between stacked layers. stacklevel
            # points at the user's constructor call, past three frames of flax's metaclass.
            warnings.warn(
                f"{name}: dropout={dropout} has no effect with num_layers=1; dropout is applied "
                "to the outputs of every layer but the last",
                UserWarning,
                stacklevel=6,
            )
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.impl, self.unroll, self.checkpoint_every = impl, unroll, checkpoint_every
        self.deterministic = False  # torch modules start in training mode too
        self.rngs = nnx.data(_dropout_stream(name, rngs).fork() if self._uses_dropout() else None)
        self._set_params(params)

    def _uses_dropout(self) -> bool:
        return self.dropout > 0 and self.num_layers > 1

    def set_view(self, deterministic: bool | None = None) -> None:
        """Lets ``nnx.view(model, deterministic=...)`` switch dropout off or on."""
        if deterministic is not None:
            self.deterministic = deterministic

    def _dropout_key(self, deterministic: bool | None, rngs: _KeySource) -> jax.Array | None:
        """The key for the functional call: None (no dropout) unless training with dropout > 0."""
        if not self._uses_dropout():
            return None
        if deterministic if deterministic is not None else self.deterministic:
            return None
        source = rngs if rngs is not None else self.rngs
        if isinstance(source, nnx.Rngs):
            source = _dropout_stream(type(self).__name__, source)
        if isinstance(source, nnx.RngStream):
            return source()
        if isinstance(source, jax.Array):
            return source
        raise TypeError(
            f"{type(self).__name__}: rngs must be nnx.Rngs, nnx.RngStream or a PRNG key, "
            f"got {type(source).__name__}"
        )

    def _options(self, deterministic: bool | None, rngs: _KeySource) -> dict:
        return dict(
            batch_first=self.batch_first,
            dropout=self.dropout,
            key=self._dropout_key(deterministic, rngs),
            impl=self.impl,
            unroll=self.unroll,
            checkpoint_every=self.checkpoint_every,
        )


def _dropout_stream(module: str, rngs: nnx.Rngs) -> nnx.RngStream:
    try:
        return rngs["dropout"]
    except KeyError:
        raise ValueError(
            f"{module}: dropout > 0 needs a 'dropout' (or 'default') stream in rngs, e.g. "
            "nnx.Rngs(0) or nnx.Rngs(params=0, dropout=1)"
        ) from None


def _init_key(rngs: nnx.Rngs) -> jax.Array:
    return rngs.params()


class LSTM(_Layer):
    """Multi-layer LSTM with ``torch.nn.LSTM``'s arguments, call and parameter names.

    Args:
        input_size: features per time step of ``x``.
        hidden_size: features of the hidden and cell state.
        num_layers: stacked layers.
        bias: whether the ``bias_ih_l{k}``/``bias_hh_l{k}`` parameters exist.
        batch_first: ``x`` and ``output`` are ``(N, L, *)`` instead of ``(L, N, *)``.
        dropout: dropout on the outputs of every layer but the last, in training mode only.
        bidirectional: run a reverse direction too (``*_reverse`` parameters).
        proj_size: if > 0, project ``h`` to this size (``weight_hr_l{k}``).
        dtype: parameter dtype.
        impl, unroll, checkpoint_every: passed to :func:`jlstm.lstm` on every call: the time
            loop's implementation (``"auto"``: the fastest that applies on the platform compiled
            for), time steps per loop iteration, and steps per recomputed segment of the backward.
        rngs: ``params`` stream for init (torch's ``U(-1/sqrt(H), 1/sqrt(H))``), ``dropout`` stream
            for dropout masks.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jlstm import nn
    >>> lstm = nn.LSTM(8, 16, num_layers=2, bidirectional=True, rngs=nnx.Rngs(0))
    >>> output, (h_n, c_n) = lstm(jnp.ones((5, 3, 8)))  # (seq_len, batch, input_size)
    >>> output.shape, h_n.shape, c_n.shape
    ((5, 3, 32), (4, 3, 16), (4, 3, 16))
    >>> sorted(lstm.state_dict())[:2]
    ['bias_hh_l0', 'bias_hh_l0_reverse']
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        *,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        dtype: jnp.dtype = jnp.float32,
        impl: str = "auto",
        unroll: int = 1,
        checkpoint_every: int | None = None,
        rngs: nnx.Rngs,
    ):
        params = jlstm.init_lstm(
            _init_key(rngs),
            input_size,
            hidden_size,
            num_layers,
            bias=bias,
            bidirectional=bidirectional,
            proj_size=proj_size,
            dtype=dtype,
        )
        self.proj_size = proj_size
        super().__init__(
            params,
            input_size=input_size,
            hidden_size=hidden_size,
            num_layers=num_layers,
            bias=bias,
            batch_first=batch_first,
            dropout=dropout,
            bidirectional=bidirectional,
            impl=impl,
            unroll=unroll,
            checkpoint_every=checkpoint_every,
            rngs=rngs,
        )

    def __call__(
        self,
        x: jax.Array,
        state: tuple[jax.Array, jax.Array] | None = None,
        *,
        seq_lengths: jax.Array | None = None,
        deterministic: bool | None = None,
        rngs: _KeySource = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """``output, (h_n, c_n) = lstm(x, (h_0, c_0))``, shapes as :func:`jlstm.lstm`.

        ``seq_lengths`` (N,) treats ``x`` as padded, like torch's packed sequences.
        ``deterministic`` and ``rngs`` override the module's mode and dropout stream for one call.
        """
        return jlstm.lstm(
            self.state_dict(),
            x,
            state,
            seq_lengths=seq_lengths,
            **self._options(deterministic, rngs),
        )


class GRU(_Layer):
    """Multi-layer GRU with ``torch.nn.GRU``'s arguments, call and parameter names.

    Arguments as :class:`LSTM`, without ``proj_size``.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jlstm import nn
    >>> gru = nn.GRU(8, 16, batch_first=True, rngs=nnx.Rngs(0))
    >>> output, h_n = gru(jnp.ones((3, 5, 8)))  # (batch, seq_len, input_size)
    >>> output.shape, h_n.shape
    ((3, 5, 16), (1, 3, 16))
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        *,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        dtype: jnp.dtype = jnp.float32,
        impl: str = "auto",
        unroll: int = 1,
        checkpoint_every: int | None = None,
        rngs: nnx.Rngs,
    ):
        params = jlstm.init_gru(
            _init_key(rngs),
            input_size,
            hidden_size,
            num_layers,
            bias=bias,
            bidirectional=bidirectional,
            dtype=dtype,
        )
        super().__init__(
            params,
            input_size=input_size,
            hidden_size=hidden_size,
            num_layers=num_layers,
            bias=bias,
            batch_first=batch_first,
            dropout=dropout,
            bidirectional=bidirectional,
            impl=impl,
            unroll=unroll,
            checkpoint_every=checkpoint_every,
            rngs=rngs,
        )

    def __call__(
        self,
        x: jax.Array,
        h0: jax.Array | None = None,
        *,
        seq_lengths: jax.Array | None = None,
        deterministic: bool | None = None,
        rngs: _KeySource = None,
    ) -> tuple[jax.Array, jax.Array]:
        """``output, h_n = gru(x, h_0)``, shapes as :func:`jlstm.gru`; options as :meth:`LSTM.__call__`."""
        return jlstm.gru(
            self.state_dict(),
            x,
            h0,
            seq_lengths=seq_lengths,
            **self._options(deterministic, rngs),
        )


class RNN(_Layer):
    """Multi-layer Elman RNN with ``torch.nn.RNN``'s arguments, call and parameter names.

    Arguments as :class:`LSTM`, without ``proj_size``, plus ``nonlinearity`` (``"tanh"`` or ``"relu"``).

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jlstm import nn
    >>> rnn = nn.RNN(8, 16, nonlinearity="relu", rngs=nnx.Rngs(0))
    >>> output, h_n = rnn(jnp.ones((5, 8)))  # unbatched (seq_len, input_size)
    >>> output.shape, h_n.shape
    ((5, 16), (1, 16))
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        *,
        nonlinearity: str = "tanh",
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        dtype: jnp.dtype = jnp.float32,
        impl: str = "auto",
        unroll: int = 1,
        checkpoint_every: int | None = None,
        rngs: nnx.Rngs,
    ):
        params = jlstm.init_rnn(
            _init_key(rngs),
            input_size,
            hidden_size,
            num_layers,
            nonlinearity=nonlinearity,
            bias=bias,
            bidirectional=bidirectional,
            dtype=dtype,
        )
        self.nonlinearity = nonlinearity
        super().__init__(
            params,
            input_size=input_size,
            hidden_size=hidden_size,
            num_layers=num_layers,
            bias=bias,
            batch_first=batch_first,
            dropout=dropout,
            bidirectional=bidirectional,
            impl=impl,
            unroll=unroll,
            checkpoint_every=checkpoint_every,
            rngs=rngs,
        )

    def __call__(
        self,
        x: jax.Array,
        h0: jax.Array | None = None,
        *,
        seq_lengths: jax.Array | None = None,
        deterministic: bool | None = None,
        rngs: _KeySource = None,
    ) -> tuple[jax.Array, jax.Array]:
        """``output, h_n = rnn(x, h_0)``, shapes as :func:`jlstm.rnn`; options as :meth:`LSTM.__call__`."""
        return jlstm.rnn(
            self.state_dict(),
            x,
            h0,
            nonlinearity=self.nonlinearity,
            seq_lengths=seq_lengths,
            **self._options(deterministic, rngs),
        )


class _Cell(_TorchParams):
    def __init__(
        self, params: Mapping[str, jax.Array], input_size: int, hidden_size: int, bias: bool
    ):
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        self._set_params(params)


class LSTMCell(_Cell):
    """One LSTM step with ``torch.nn.LSTMCell``'s arguments and parameter names.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jlstm import nn
    >>> cell = nn.LSTMCell(8, 16, rngs=nnx.Rngs(0))
    >>> h, c = cell(jnp.ones((3, 8)))  # (batch, input_size) or (input_size,)
    >>> h.shape, c.shape
    ((3, 16), (3, 16))
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        *,
        dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        params = jlstm.init_lstm_cell(
            _init_key(rngs), input_size, hidden_size, bias=bias, dtype=dtype
        )
        super().__init__(params, input_size, hidden_size, bias)

    def __call__(
        self, x: jax.Array, state: tuple[jax.Array, jax.Array] | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """``h, c = cell(x, (h, c))``; ``state=None`` starts from zeros."""
        return jlstm.lstm_cell(self.state_dict(), x, state)


class GRUCell(_Cell):
    """One GRU step with ``torch.nn.GRUCell``'s arguments and parameter names.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jlstm import nn
    >>> cell = nn.GRUCell(8, 16, rngs=nnx.Rngs(0))
    >>> cell(jnp.ones((3, 8))).shape
    (3, 16)
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        *,
        dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        params = jlstm.init_gru_cell(
            _init_key(rngs), input_size, hidden_size, bias=bias, dtype=dtype
        )
        super().__init__(params, input_size, hidden_size, bias)

    def __call__(self, x: jax.Array, h: jax.Array | None = None) -> jax.Array:
        """``h = cell(x, h)``; ``h=None`` starts from zeros."""
        return jlstm.gru_cell(self.state_dict(), x, h)


class RNNCell(_Cell):
    """One Elman RNN step with ``torch.nn.RNNCell``'s arguments and parameter names.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jlstm import nn
    >>> cell = nn.RNNCell(8, 16, nonlinearity="relu", rngs=nnx.Rngs(0))
    >>> cell(jnp.ones((3, 8))).shape
    (3, 16)
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        nonlinearity: str = "tanh",
        *,
        dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        params = jlstm.init_rnn_cell(
            _init_key(rngs),
            input_size,
            hidden_size,
            nonlinearity=nonlinearity,
            bias=bias,
            dtype=dtype,
        )
        self.nonlinearity = nonlinearity
        super().__init__(params, input_size, hidden_size, bias)

    def __call__(self, x: jax.Array, h: jax.Array | None = None) -> jax.Array:
        """``h = cell(x, h)``; ``h=None`` starts from zeros."""
        return jlstm.rnn_cell(self.state_dict(), x, h, nonlinearity=self.nonlinearity)
