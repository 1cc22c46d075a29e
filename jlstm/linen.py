"""``flax.linen`` modules for existing Linen codebases: ``LSTM``, ``GRU`` and ``RNN``.

Each module's ``params`` collection is the flat torch-named dict that the functional API takes
(``weight_ih_l0``, ``bias_hh_l0_reverse``, ...), initialised by :mod:`jlstm`'s init functions (torch's
``U(-1/sqrt(H), 1/sqrt(H))``), so torch weights go in and out with no renaming::

    variables = {"params": jlstm.from_torch(torch_lstm.state_dict())}
    state_dict = jlstm.to_torch(variables["params"])

As usual in Linen the input size is read from ``x`` at ``init``; the other fields are torch's
constructor arguments. Dropout between stacked layers follows Linen's ``nn.Dropout``: set
``deterministic`` as a field or at call time (not both), and pass a ``'dropout'`` RNG to ``apply``
when training.

This module imports Flax; the core package does not, so use ``from jlstm import linen``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import jlstm

__all__ = ["LSTM", "GRU", "RNN"]


def _torch_params(module: nn.Module, init_fn: Callable[[jax.Array], dict]) -> dict[str, jax.Array]:
    """Registers every array of ``init_fn(key)`` as a Linen param of the same (torch) name."""
    names = jax.eval_shape(init_fn, jax.random.key(0))
    initialised: dict[str, jax.Array] = {}

    def init_one(key: jax.Array, name: str) -> jax.Array:
        # One call of the core init with the first missing param's key, so the whole layer is
        # drawn exactly as the functional API would draw it from that key.
        if not initialised:
            initialised.update(init_fn(key))
        return initialised[name]

    return {name: module.param(name, init_one, name) for name in names}


def _dropout_key(module: _Layer, deterministic: bool | None) -> jax.Array | None:
    if module.dropout == 0 or module.num_layers == 1:
        return None
    if nn.merge_param("deterministic", module.deterministic, deterministic):
        return None
    return module.make_rng("dropout")


class _Layer(nn.Module):
    # Fields shared by LSTM, GRU and RNN; redeclared per class only where they differ.
    hidden_size: int
    num_layers: int = 1
    bias: bool = True
    batch_first: bool = False
    dropout: float = 0.0
    bidirectional: bool = False
    dtype: Any = jnp.float32
    deterministic: bool | None = None
    impl: str = "auto"
    unroll: int = 1
    checkpoint_every: int | None = None


class LSTM(_Layer):
    """Multi-layer LSTM with ``torch.nn.LSTM``'s options, as a Linen module.

    Attributes:
        hidden_size: features of the hidden and cell state.
        num_layers: stacked layers.
        bias: whether the ``bias_ih_l{k}``/``bias_hh_l{k}`` params exist.
        batch_first: ``x`` and ``output`` are ``(N, L, *)`` instead of ``(L, N, *)``.
        dropout: dropout on the outputs of every layer but the last, when not deterministic.
        bidirectional: run a reverse direction too (``*_reverse`` params).
        proj_size: if > 0, project ``h`` to this size (``weight_hr_l{k}``).
        dtype: parameter dtype.
        deterministic: disables dropout; may instead be passed at call time.
        impl, unroll, checkpoint_every: passed to :func:`jlstm.lstm`: the time loop's
            implementation (``"auto"``: the fastest that applies on the platform compiled for),
            time steps per loop iteration, and steps per recomputed segment of the backward.

    >>> import jax, jax.numpy as jnp
    >>> from jlstm import linen
    >>> model = linen.LSTM(16, num_layers=2, bidirectional=True)
    >>> x = jnp.ones((5, 3, 8))  # (seq_len, batch, input_size)
    >>> variables = model.init(jax.random.key(0), x)
    >>> output, (h_n, c_n) = model.apply(variables, x)
    >>> output.shape, h_n.shape, variables["params"]["weight_ih_l1_reverse"].shape
    ((5, 3, 32), (4, 3, 16), (64, 32))
    """

    proj_size: int = 0

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        state: tuple[jax.Array, jax.Array] | None = None,
        *,
        seq_lengths: jax.Array | None = None,
        deterministic: bool | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """``output, (h_n, c_n) = model.apply(variables, x, (h_0, c_0))``, as :func:`jlstm.lstm`."""
        init = functools.partial(
            jlstm.init_lstm,
            input_size=x.shape[-1],
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
            bias=self.bias,
            bidirectional=self.bidirectional,
            proj_size=self.proj_size,
            dtype=self.dtype,
        )
        return jlstm.lstm(
            _torch_params(self, init),
            x,
            state,
            batch_first=self.batch_first,
            seq_lengths=seq_lengths,
            dropout=self.dropout,
            key=_dropout_key(self, deterministic),
            impl=self.impl,
            unroll=self.unroll,
            checkpoint_every=self.checkpoint_every,
        )


class GRU(_Layer):
    """Multi-layer GRU with ``torch.nn.GRU``'s options, as a Linen module.

    Attributes as :class:`LSTM`, without ``proj_size``.

    >>> import jax, jax.numpy as jnp
    >>> from jlstm import linen
    >>> model = linen.GRU(16, batch_first=True)
    >>> x = jnp.ones((3, 5, 8))  # (batch, seq_len, input_size)
    >>> output, h_n = model.apply(model.init(jax.random.key(0), x), x)
    >>> output.shape, h_n.shape
    ((3, 5, 16), (1, 3, 16))
    """

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        h0: jax.Array | None = None,
        *,
        seq_lengths: jax.Array | None = None,
        deterministic: bool | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """``output, h_n = model.apply(variables, x, h_0)``, as :func:`jlstm.gru`."""
        init = functools.partial(
            jlstm.init_gru,
            input_size=x.shape[-1],
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
            bias=self.bias,
            bidirectional=self.bidirectional,
            dtype=self.dtype,
        )
        return jlstm.gru(
            _torch_params(self, init),
            x,
            h0,
            batch_first=self.batch_first,
            seq_lengths=seq_lengths,
            dropout=self.dropout,
            key=_dropout_key(self, deterministic),
            impl=self.impl,
            unroll=self.unroll,
            checkpoint_every=self.checkpoint_every,
        )


class RNN(_Layer):
    """Multi-layer Elman RNN with ``torch.nn.RNN``'s options, as a Linen module.

    Attributes as :class:`LSTM`, without ``proj_size``, plus ``nonlinearity`` (``"tanh"`` or ``"relu"``).

    >>> import jax, jax.numpy as jnp
    >>> from jlstm import linen
    >>> model = linen.RNN(16, nonlinearity="relu")
    >>> x = jnp.ones((5, 8))  # unbatched (seq_len, input_size)
    >>> output, h_n = model.apply(model.init(jax.random.key(0), x), x)
    >>> output.shape, h_n.shape
    ((5, 16), (1, 16))
    """

    nonlinearity: str = "tanh"

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        h0: jax.Array | None = None,
        *,
        seq_lengths: jax.Array | None = None,
        deterministic: bool | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """``output, h_n = model.apply(variables, x, h_0)``, as :func:`jlstm.rnn`."""
        init = functools.partial(
            jlstm.init_rnn,
            input_size=x.shape[-1],
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
            nonlinearity=self.nonlinearity,
            bias=self.bias,
            bidirectional=self.bidirectional,
            dtype=self.dtype,
        )
        return jlstm.rnn(
            _torch_params(self, init),
            x,
            h0,
            nonlinearity=self.nonlinearity,
            batch_first=self.batch_first,
            seq_lengths=seq_lengths,
            dropout=self.dropout,
            key=_dropout_key(self, deterministic),
            impl=self.impl,
            unroll=self.unroll,
            checkpoint_every=self.checkpoint_every,
        )
