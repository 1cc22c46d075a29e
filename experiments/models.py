"""A recurrent layer with a linear head, as a plain pytree: ``{"rnn": {...}, "head": {"w", "b"}}``.

``params["rnn"]`` is keyed like torch's ``state_dict`` (``weight_ih_l0`` ...), so it round-trips
through :func:`jlstm.to_torch`; the head is ``y = x @ w + b`` with torch ``nn.Linear``'s init.

>>> import jax, jax.numpy as jnp
>>> params = init(jax.random.key(0), "gru", 28, 64, 10)
>>> output, state = recurrent("gru", params, jnp.zeros((5, 28, 28)), batch_first=True)
>>> head(params, last_hidden("gru", state)).shape
(5, 10)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

import jlstm

CELLS = ("lstm", "gru", "rnn")
_INIT = {"lstm": jlstm.init_lstm, "gru": jlstm.init_gru, "rnn": jlstm.init_rnn}
_APPLY = {"lstm": jlstm.lstm, "gru": jlstm.gru, "rnn": jlstm.rnn}


def init(
    key: jax.Array,
    cell: str,
    input_size: int,
    hidden_size: int,
    output_size: int,
    *,
    num_layers: int = 1,
    bidirectional: bool = False,
) -> dict:
    """Parameters of a ``cell`` layer (``"lstm"``, ``"gru"`` or ``"rnn"``) and a linear head."""
    rnn_key, w_key, b_key = jax.random.split(key, 3)
    rnn = _INIT[cell](rnn_key, input_size, hidden_size, num_layers, bidirectional=bidirectional)
    features = (2 if bidirectional else 1) * hidden_size
    bound = features**-0.5  # torch nn.Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    dtype = jax.tree.leaves(rnn)[0].dtype
    w = jax.random.uniform(w_key, (features, output_size), dtype, -bound, bound)
    b = jax.random.uniform(b_key, (output_size,), dtype, -bound, bound)
    return {"rnn": rnn, "head": {"w": w, "b": b}}


def recurrent(
    cell: str, params: dict, x: jax.Array, state: Any = None, *, batch_first: bool = False
) -> tuple[jax.Array, Any]:
    """Runs the recurrent layer: ``(output, state)``; ``state`` is ``(h, c)`` for an LSTM, else ``h``."""
    return _APPLY[cell](params["rnn"], x, state, batch_first=batch_first)


def last_hidden(cell: str, state: Any, *, bidirectional: bool = False) -> jax.Array:
    """The top layer's final hidden state, both directions concatenated: ``(N, D * H)``."""
    h_n = state[0] if cell == "lstm" else state
    if bidirectional:
        return jnp.concatenate([h_n[-2], h_n[-1]], axis=-1)
    return h_n[-1]


def head(params: dict, features: jax.Array) -> jax.Array:
    """The linear head, applied over the last axis."""
    y = features @ params["head"]["w"]
    return y + jnp.broadcast_to(params["head"]["b"], y.shape)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout: each entry zeroed with probability ``rate``, the others scaled by
    ``1 / (1 - rate)``; ``x`` itself where ``key`` is None (evaluation) or ``rate`` is 0.

    >>> import jax, jax.numpy as jnp
    >>> dropout(jnp.ones(3), 0.5, None).tolist()
    [1.0, 1.0, 1.0]
    >>> sorted(set(dropout(jnp.ones(100), 0.5, jax.random.key(0)).tolist()))
    [0.0, 2.0]
    """
    if key is None or rate == 0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0)
