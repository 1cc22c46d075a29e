"""One time step of LSTM, GRU and Elman RNN: torch's equations, nothing else.

Each ``*_step`` function is a ``lax.scan`` body ``(carry, xw_t) -> (carry, y_t)`` whose input ``xw_t``
is the time step's input projection ``x_t @ W_ih.T + b`` already computed for all steps at once by the
layer (the biases that torch adds outside a nonlinearity are folded in there), so that only the
recurrent matmul stays inside the loop. The public cells (``lstm_cell`` ...) are these steps plus the
input projection, with ``torch.nn.LSTMCell`` / ``GRUCell`` / ``RNNCell`` semantics.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from jlstm import params as P


def sigmoid(x: jax.Array) -> jax.Array:
    # sigmoid(x) = (1 + tanh(x/2)) / 2: one tanh, no division; exact to rounding and faster on XLA CPU.
    return 0.5 * jnp.tanh(0.5 * x) + 0.5


def lstm_step(w_hh: jax.Array, w_hr: jax.Array | None, carry, xw_t: jax.Array):
    r"""LSTM step; ``xw_t = x_t W_{ih}^T + b_{ih} + b_{hh}`` (gate order i, f, g, o).

    .. math::
        i, f, g, o &= \sigma, \sigma, \tanh, \sigma\,(xw_t + h_{t-1} W_{hh}^T) \\
        c_t &= f \odot c_{t-1} + i \odot g \\
        h_t &= (o \odot \tanh(c_t))\, W_{hr}^T \quad (W_{hr} \text{ only with proj\_size})
    """
    h, c = carry
    i, f, g, o = jnp.split(xw_t + h @ w_hh.T, 4, axis=-1)
    c = sigmoid(f) * c + sigmoid(i) * jnp.tanh(g)
    h = sigmoid(o) * jnp.tanh(c)
    if w_hr is not None:
        h = h @ w_hr.T
    return (h, c), h


def gru_step(w_hh: jax.Array, b_hn: jax.Array | None, h: jax.Array, xw_t: jax.Array):
    r"""GRU step; ``xw_t = x_t W_{ih}^T + b_{ih} + [b_{hr}, b_{hz}, 0]`` (gate order r, z, n).

    .. math::
        r &= \sigma(xw_r + h W_{hr}^T) \qquad z = \sigma(xw_z + h W_{hz}^T) \\
        n &= \tanh(xw_n + r \odot (h W_{hn}^T + b_{hn})) \\
        h_t &= (1 - z) \odot n + z \odot h_{t-1}
    """
    x_r, x_z, x_n = jnp.split(xw_t, 3, axis=-1)
    h_r, h_z, h_n = jnp.split(h @ w_hh.T, 3, axis=-1)
    if b_hn is not None:
        h_n = h_n + _rows(b_hn, h_n)
    r = sigmoid(x_r + h_r)
    z = sigmoid(x_z + h_z)
    n = jnp.tanh(x_n + r * h_n)
    h = n + z * (h - n)
    return h, h


def rnn_step(w_hh: jax.Array, nonlinearity: str, h: jax.Array, xw_t: jax.Array):
    r"""Elman RNN step; ``xw_t = x_t W_{ih}^T + b_{ih} + b_{hh}``:
    :math:`h_t = \tanh(xw_t + h_{t-1} W_{hh}^T)` (or ReLU)."""
    pre = xw_t + h @ w_hh.T
    h = jnp.tanh(pre) if nonlinearity == "tanh" else jax.nn.relu(pre)
    return h, h


def folded_biases(kind: str, w: P.Weights) -> tuple[jax.Array | None, jax.Array | None]:
    """Every bias that torch adds before a nonlinearity, summed into one ``(G*H,)`` vector, and for
    GRU ``b_hn``, which sits inside ``r * (...)`` and cannot be folded; ``(None, None)`` without bias."""
    if w.b_ih is None:
        return None, None
    if kind == "gru":
        hidden = w.b_hh.shape[0] // 3
        folded = w.b_ih + jnp.concatenate(
            [w.b_hh[: 2 * hidden], jnp.zeros_like(w.b_hh[2 * hidden :])]
        )
        return folded, w.b_hh[2 * hidden :]
    return w.b_ih + w.b_hh, None


def input_projection(kind: str, w: P.Weights, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """``x @ W_ih.T`` plus the folded biases, for any number of leading axes of ``x``, and ``b_hn``."""
    bias, b_hn = folded_biases(kind, w)
    xw = x @ w.w_ih.T
    return (xw if bias is None else xw + _rows(bias, xw)), b_hn


def _rows(b: jax.Array, like: jax.Array) -> jax.Array:
    """A bias vector with ``like``'s leading axes added, so it adds under ``jax_numpy_rank_promotion="raise"``."""
    return jnp.expand_dims(b, tuple(range(like.ndim - 1)))


def step_fn(kind: str, w: P.Weights, b_hn: jax.Array | None, nonlinearity: str = "tanh"):
    """The scan body of one direction of one layer, weights bound."""
    if kind == "lstm":
        return partial(lstm_step, w.w_hh, w.w_hr)
    if kind == "gru":
        return partial(gru_step, w.w_hh, b_hn)
    return partial(rnn_step, w.w_hh, nonlinearity)


# --------------------------------------------------------------------------------------------
# public cells


def _cell_input(fn: str, w: P.Weights, x) -> jax.Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"{fn}: x has dtype {x.dtype}; expected a floating dtype, e.g. x.astype(jnp.float32)"
        )
    input_size = w.w_ih.shape[1]
    if x.ndim not in (1, 2) or x.shape[-1] != input_size:
        raise ValueError(
            f"{fn}: x has shape {x.shape} but the cell expects (batch, {input_size}) or unbatched "
            f"({input_size},) (weight_ih is {tuple(w.w_ih.shape)})"
        )
    return x


def _cell_state(fn: str, name: str, s, x: jax.Array, size: int, dtype) -> jax.Array:
    shape = x.shape[:-1] + (size,)
    if s is None:
        return jnp.zeros(shape, dtype)
    s = jnp.asarray(s)
    if s.shape != shape:
        raise ValueError(
            f"{fn}: {name} has shape {s.shape} but x of shape {x.shape} needs {shape}; pass None for zeros"
        )
    return s.astype(dtype)


def state_pair(fn: str, state, names: str, hint: str = "") -> tuple:
    """An LSTM state as a ``(h, c)`` pair, ``None`` as ``(None, None)``; anything else raises."""
    if state is None:
        return None, None
    if not isinstance(state, (tuple, list)) or len(state) != 2:
        raise ValueError(
            f"{fn}: state must be a pair {names} or None, got {type(state).__name__}"
            f"{f' of length {len(state)}' if isinstance(state, (tuple, list)) else ''}{hint}"
        )
    return tuple(state)


def lstm_cell(
    params: dict, x: jax.Array, state: tuple[jax.Array, jax.Array] | None = None
) -> tuple[jax.Array, jax.Array]:
    """``torch.nn.LSTMCell``: one step, ``(h, c) = lstm_cell(params, x, (h, c))``.

    Args:
      params: ``weight_ih (4H, I)``, ``weight_hh (4H, H)``, optionally ``bias_ih``, ``bias_hh (4H,)``.
      x: ``(N, I)`` or unbatched ``(I,)``.
      state: ``(h, c)``, each ``(N, H)`` (or ``(H,)``); ``None`` means zeros.

    Returns:
      ``(h, c)``, each ``(N, H)`` (or ``(H,)``).

    >>> import jax, jax.numpy as jnp, jlstm
    >>> p = jlstm.init_lstm_cell(jax.random.key(0), 3, 5)
    >>> h, c = jlstm.lstm_cell(p, jnp.ones((2, 3)))
    >>> h.shape, c.shape
    ((2, 5), (2, 5))
    """
    w = P.cell_weights("lstm_cell", "lstm", params)
    x = _cell_input("lstm_cell", w, x)
    hidden = w.w_hh.shape[1]
    dtype = jnp.result_type(x, w.w_hh)
    state = state_pair("lstm_cell", state, "(h, c)")
    h = _cell_state("lstm_cell", "h", state[0], x, hidden, dtype)
    c = _cell_state("lstm_cell", "c", state[1], x, hidden, dtype)
    xw, _ = input_projection("lstm", w, x)
    (h, c), _ = lstm_step(w.w_hh, None, (h, c), xw)
    return h, c


def gru_cell(params: dict, x: jax.Array, h: jax.Array | None = None) -> jax.Array:
    """``torch.nn.GRUCell``: ``h = gru_cell(params, x, h)``; shapes as :func:`lstm_cell` with 3H rows.

    >>> import jax, jax.numpy as jnp, jlstm
    >>> jlstm.gru_cell(jlstm.init_gru_cell(jax.random.key(0), 3, 5), jnp.ones(3)).shape
    (5,)
    """
    w = P.cell_weights("gru_cell", "gru", params)
    x = _cell_input("gru_cell", w, x)
    h = _cell_state("gru_cell", "h", h, x, w.w_hh.shape[1], jnp.result_type(x, w.w_hh))
    xw, b_hn = input_projection("gru", w, x)
    h, _ = gru_step(w.w_hh, b_hn, h, xw)
    return h


def rnn_cell(
    params: dict, x: jax.Array, h: jax.Array | None = None, *, nonlinearity: str = "tanh"
) -> jax.Array:
    """``torch.nn.RNNCell``: ``h = rnn_cell(params, x, h, nonlinearity="tanh" | "relu")``.

    >>> import jax, jax.numpy as jnp, jlstm
    >>> jlstm.rnn_cell(jlstm.init_rnn_cell(jax.random.key(0), 3, 5), jnp.ones((2, 3))).shape
    (2, 5)
    """
    P._check_nonlinearity("rnn_cell", nonlinearity)
    w = P.cell_weights("rnn_cell", "rnn", params)
    x = _cell_input("rnn_cell", w, x)
    h = _cell_state("rnn_cell", "h", h, x, w.w_hh.shape[1], jnp.result_type(x, w.w_hh))
    xw, _ = input_projection("rnn", w, x)
    h, _ = rnn_step(w.w_hh, nonlinearity, h, xw)
    return h
