"""Layers: the cells scanned over time, stacked, bidirectional, with lengths and dropout.

``lstm``, ``gru`` and ``rnn`` mirror ``torch.nn.LSTM`` / ``GRU`` / ``RNN`` called on a padded batch, or on
a packed one when ``seq_lengths`` is given. Every check of the input happens here, once, at trace time.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp

from jlstm import backends, cells
from jlstm import params as P


def _check_input(fn: str, x, structure: P.Structure, batch_first: bool) -> tuple[jax.Array, bool]:
    """Returns x as time-major ``(L, N, I)`` and whether the caller's input had a batch axis."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"{fn}: x has dtype {x.dtype}; expected a floating dtype (float32, float64 or "
            "bfloat16): convert it first, e.g. x.astype(jnp.float32)"
        )
    layout = "(batch, seq_len, input_size)" if batch_first else "(seq_len, batch, input_size)"
    if x.ndim not in (2, 3) or x.shape[-1] != structure.input_size:
        raise ValueError(
            f"{fn}: x has shape {x.shape} but weight_ih_l0 expects input_size {structure.input_size}; "
            f"x must be {layout} or unbatched (seq_len, input_size)"
            f"{'' if batch_first else ', or (batch, seq_len, input_size) with batch_first=True'}"
        )
    if x.ndim == 2:
        return x[:, None, :], False
    return (jnp.swapaxes(x, 0, 1) if batch_first else x), True


def _check_state(fn: str, name: str, s, shape: tuple[int, ...], batched: bool, dtype) -> jax.Array:
    """A state as ``(D*num_layers, N, size)``; None means zeros; unbatched states lack the N axis."""
    if s is None:
        return jnp.zeros(shape, dtype)
    s = jnp.asarray(s)
    want = shape if batched else (shape[0], shape[2])
    if s.shape != want:
        raise ValueError(
            f"{fn}: {name} has shape {s.shape} but must be (D*num_layers, "
            f"{'batch, ' if batched else ''}{'hidden_size' if name == 'c0' else 'H_out'}) = {want} "
            f"for this input and these params; pass None for zeros"
        )
    return (s if batched else s[:, None, :]).astype(dtype)


def _check_lengths(
    fn: str, seq_lengths, length: int, batch: int, batched: bool
) -> jax.Array | None:
    if seq_lengths is None:
        return None
    if not batched:
        raise ValueError(
            f"{fn}: seq_lengths needs a batched x (a length per batch element); "
            "x is unbatched (seq_len, input_size): drop seq_lengths or add a batch axis"
        )
    lengths = jnp.asarray(seq_lengths)
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise TypeError(
            f"{fn}: seq_lengths has dtype {lengths.dtype}; expected integers, "
            "e.g. jnp.asarray(lengths, jnp.int32)"
        )
    if lengths.shape != (batch,):
        raise ValueError(
            f"{fn}: seq_lengths has shape {lengths.shape} but x has batch size {batch}; "
            f"expected shape ({batch},), one length per sequence"
        )
    concrete = backends.known_values(lengths)
    if concrete is not None and concrete.size and (concrete.min() < 0 or concrete.max() > length):
        raise ValueError(
            f"{fn}: seq_lengths must lie in [0, {length}] (the padded seq_len), got "
            f"min {concrete.min()} and max {concrete.max()}; pad x to the longest sequence"
        )
    return lengths


def _check_dropout(fn: str, dropout) -> None:
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(
            f"{fn}: dropout must be a float in [0, 1), got {dropout!r}; it is the "
            "probability of zeroing each output of every layer but the last"
        )


def _check_speed(fn: str, unroll, checkpoint_every) -> None:
    if isinstance(unroll, bool) or not isinstance(unroll, int) or unroll < 1:
        raise ValueError(
            f"{fn}: unroll must be an int >= 1 (time steps per loop iteration), got {unroll!r}"
        )
    if checkpoint_every is not None and (
        isinstance(checkpoint_every, bool)
        or not isinstance(checkpoint_every, int)
        or checkpoint_every < 1
    ):
        raise ValueError(
            f"{fn}: checkpoint_every must be None or an int >= 1 (time steps per recomputed "
            f"segment), got {checkpoint_every!r}; e.g. checkpoint_every=64 for long sequences"
        )


@partial(
    jax.jit,
    static_argnames=("kind", "dropout", "nonlinearity", "choice", "unroll", "checkpoint_every"),
)
def _stack(
    layers: tuple[tuple[P.Weights, ...], ...],
    x: jax.Array,
    state,
    lengths: jax.Array | None,
    key: jax.Array | None,
    *,
    kind: str,
    dropout: float,
    nonlinearity: str,
    choice: backends.Choice,
    unroll: int,
    checkpoint_every: int | None,
):
    """Runs every layer and direction; ``state`` is a pytree of ``(D*num_layers, N, ·)`` arrays.

    Jitted (inputs are checked before, in :func:`_run`) so that eager calls reuse one compilation
    instead of retracing every scan; inside a caller's ``jit`` it is simply inlined.
    """
    valid = (
        None if lengths is None else (jnp.arange(x.shape[0])[:, None] < lengths[None, :])[..., None]
    )
    finals = []
    for layer, directions in enumerate(layers):
        rows = range(layer * len(directions), (layer + 1) * len(directions))
        carries = [jax.tree.map(lambda s, i=i: s[i], state) for i in rows]
        x, carries = backends.layer(
            choice,
            kind,
            directions,
            x,
            carries,
            valid,
            lengths,
            nonlinearity=nonlinearity,
            unroll=unroll,
            every=checkpoint_every,
        )
        finals += carries
        x, key = _dropout(x, dropout, key, layer == len(layers) - 1)
    return x, jax.tree.map(lambda *s: jnp.stack(s), *finals)


def _dropout(x, rate, key, last):
    """torch's dropout on the outputs of every layer but the ``last``: ``(x, the key left for the
    next layer)``."""
    if not rate or key is None or last:
        return x, key
    key, sub = jax.random.split(key)
    keep = jax.random.bernoulli(sub, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x)), key


def _run(
    fn: str,
    kind: str,
    params,
    x,
    state,
    *,
    batch_first,
    seq_lengths,
    dropout,
    key,
    nonlinearity="tanh",
    impl="auto",
    unroll=1,
    checkpoint_every=None,
):
    structure = P.layer_structure(fn, kind, params)
    _check_dropout(fn, dropout)
    _check_speed(fn, unroll, checkpoint_every)
    x, batched = _check_input(fn, x, structure, batch_first)
    length, batch = x.shape[:2]
    lengths = _check_lengths(fn, seq_lengths, length, batch, batched)
    dtype = jnp.result_type(x, structure.layers[0][0].w_hh)
    call = backends.Call(
        kind,
        structure.proj_size,
        jnp.dtype(dtype),
        structure.hidden_size,
        length,
        checkpoint_every,
        # Only cuDNN reads the lengths' values (a device-to-host copy): pass them only there.
        lengths if impl == "cudnn" else None,
    )
    choice = backends.resolve(fn, impl, call)
    rows = structure.num_layers * structure.num_directions
    h_shape = (rows, batch, structure.output_size)
    if kind == "lstm":
        state = cells.state_pair(fn, state, "(h0, c0)", "; torch's nn.LSTM takes (h_0, c_0) too")
        state = (
            _check_state(fn, "h0", state[0], h_shape, batched, dtype),
            _check_state(fn, "c0", state[1], (rows, batch, structure.hidden_size), batched, dtype),
        )
    else:
        state = _check_state(fn, "h0", state, h_shape, batched, dtype)
    output, final = _stack(
        structure.layers,
        x.astype(dtype),
        state,
        lengths,
        key,
        kind=kind,
        dropout=float(dropout),
        nonlinearity=nonlinearity,
        choice=choice,
        unroll=unroll,
        checkpoint_every=checkpoint_every,
    )
    if not batched:
        return output[:, 0], jax.tree.map(lambda s: s[:, 0], final)
    return (jnp.swapaxes(output, 0, 1) if batch_first else output), final


def lstm(
    params: dict,
    x: jax.Array,
    state: tuple[jax.Array, jax.Array] | None = None,
    *,
    batch_first: bool = False,
    seq_lengths: jax.Array | None = None,
    dropout: float = 0.0,
    key: jax.Array | None = None,
    impl: str = "auto",
    unroll: int = 1,
    checkpoint_every: int | None = None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """``torch.nn.LSTM`` as a pure function: ``output, (h_n, c_n) = lstm(params, x, (h_0, c_0))``.

    Args:
      params: torch-named dict from :func:`jlstm.init_lstm` or :func:`jlstm.from_torch`; the number of
        layers, directions, sizes, bias and ``proj_size`` are read from it.
      x: ``(L, N, I)``, ``(N, L, I)`` with ``batch_first=True``, or unbatched ``(L, I)``.
      state: ``(h_0, c_0)`` of shapes ``(D*num_layers, N, H_out)`` and ``(D*num_layers, N, H)``
        (no ``N`` axis when unbatched); ``None`` means zeros. ``H_out = proj_size or H``.
      batch_first: as torch; applies to ``x`` and ``output`` only, not to the states.
      seq_lengths: ``(N,)`` ints; the result equals torch's ``pack_padded_sequence(x, lengths,
        enforce_sorted=False)`` → LSTM → ``pad_packed_sequence(total_length=L)``: outputs past each
        length are zero, the states are taken at each sequence's last element, the reverse direction
        starts there. A length of 0 gives zero outputs and returns the initial state.
      dropout: torch's dropout on the outputs of every layer but the last, applied only when ``key``
        is given (training); without a key the call is deterministic (``module.eval()``).
      key: a PRNG key for dropout.
      impl: ``"auto"`` (default) takes, for each platform the program is lowered for, the fastest
        implementation that covers the call: the C++ loop of :mod:`jlstm.native` on CPU (LSTM
        without ``proj_size`` and GRU, float32/float64), ``"fused"`` (``lax.scan`` with the
        hand-written backward of :mod:`jlstm.fused`) on cuda, rocm and tpu, ``"scan"`` (plain
        autodiff through ``lax.scan`` over the cell) for RNN and ``proj_size``. ``"native"``,
        ``"fused"``, ``"scan"``, ``"pallas"`` (one Pallas kernel per direction: Triton on CUDA,
        interpreted on CPU; H <= 256) and ``"cudnn"`` (``jax.experimental.rnn``; CUDA, float32,
        LSTM, lengths >= 1) ask for one; lowering it for a platform it does not lower for raises a
        ``ValueError``. :mod:`jlstm.backends` holds the table. All give torch's numbers and
        support every JAX transformation.
      unroll: time steps per loop iteration (``lax.scan``'s ``unroll``); a speed knob only.
      checkpoint_every: memory knob for training on long sequences: the backward pass keeps the
        state every ``checkpoint_every`` steps and recomputes the steps in between
        (``jax.checkpoint`` per segment), so activation memory grows with ``L / checkpoint_every +
        checkpoint_every`` instead of ``L``, for about one extra forward pass. ``None`` (default)
        keeps every step. The numbers are the same either way.

    Returns:
      ``output`` ``(L, N, D*H_out)`` (``(N, L, D*H_out)`` with ``batch_first``) and ``(h_n, c_n)``.

    >>> import jax, jax.numpy as jnp, jlstm
    >>> params = jlstm.init_lstm(jax.random.key(0), 28, 64, num_layers=2, bidirectional=True)
    >>> out, (h, c) = jlstm.lstm(params, jnp.ones((8, 28, 28)), batch_first=True)
    >>> out.shape, h.shape, c.shape
    ((8, 28, 128), (4, 8, 64), (4, 8, 64))
    """
    return _run(
        "lstm",
        "lstm",
        params,
        x,
        state,
        batch_first=batch_first,
        seq_lengths=seq_lengths,
        dropout=dropout,
        key=key,
        impl=impl,
        unroll=unroll,
        checkpoint_every=checkpoint_every,
    )


def gru(
    params: dict,
    x: jax.Array,
    h0: jax.Array | None = None,
    *,
    batch_first: bool = False,
    seq_lengths: jax.Array | None = None,
    dropout: float = 0.0,
    key: jax.Array | None = None,
    impl: str = "auto",
    unroll: int = 1,
    checkpoint_every: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """``torch.nn.GRU`` as a pure function: ``output, h_n = gru(params, x, h_0)``.

    Arguments and shapes as :func:`lstm`, with a single state ``h_0`` of shape ``(D*num_layers, N, H)``.

    >>> import jax, jax.numpy as jnp, jlstm
    >>> out, h = jlstm.gru(jlstm.init_gru(jax.random.key(0), 4, 8), jnp.ones((5, 2, 4)))
    >>> out.shape, h.shape
    ((5, 2, 8), (1, 2, 8))
    """
    return _run(
        "gru",
        "gru",
        params,
        x,
        h0,
        batch_first=batch_first,
        seq_lengths=seq_lengths,
        dropout=dropout,
        key=key,
        impl=impl,
        unroll=unroll,
        checkpoint_every=checkpoint_every,
    )


def rnn(
    params: dict,
    x: jax.Array,
    h0: jax.Array | None = None,
    *,
    nonlinearity: str = "tanh",
    batch_first: bool = False,
    seq_lengths: jax.Array | None = None,
    dropout: float = 0.0,
    key: jax.Array | None = None,
    impl: str = "auto",
    unroll: int = 1,
    checkpoint_every: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """``torch.nn.RNN`` (Elman, ``nonlinearity="tanh"`` or ``"relu"``): ``output, h_n = rnn(params, x, h_0)``.

    Arguments and shapes as :func:`gru`.

    >>> import jax, jax.numpy as jnp, jlstm
    >>> p = jlstm.init_rnn(jax.random.key(0), 4, 8, nonlinearity="relu")
    >>> jlstm.rnn(p, jnp.ones((5, 4)), nonlinearity="relu")[0].shape
    (5, 8)
    """
    P._check_nonlinearity("rnn", nonlinearity)
    return _run(
        "rnn",
        "rnn",
        params,
        x,
        h0,
        batch_first=batch_first,
        seq_lengths=seq_lengths,
        dropout=dropout,
        key=key,
        nonlinearity=nonlinearity,
        impl=impl,
        unroll=unroll,
        checkpoint_every=checkpoint_every,
    )


def pad_sequence(
    sequences: Sequence[jax.Array], batch_first: bool = False, padding_value: float = 0.0
) -> jax.Array:
    """``torch.nn.utils.rnn.pad_sequence``: stack ``(L_i, *)`` arrays into ``(L_max, N, *)``
    (``(N, L_max, *)`` with ``batch_first``), padding with ``padding_value``.

    >>> import jax.numpy as jnp, jlstm
    >>> jlstm.pad_sequence([jnp.ones((3, 2)), jnp.ones((1, 2))], batch_first=True)[1, :, 0]
    Array([1., 0., 0.], dtype=float32)
    """
    if len(sequences) == 0:
        raise ValueError("pad_sequence: got an empty list; expected at least one (L_i, *) array")
    sequences = [jnp.asarray(s) for s in sequences]
    trailing = sequences[0].shape[1:]
    for i, s in enumerate(sequences):
        if s.ndim < 1 or s.shape[1:] != trailing:
            raise ValueError(
                f"pad_sequence: sequence {i} has shape {s.shape} but every sequence must be "
                f"(L_i, *{trailing}) like sequence 0; only the first axis may differ"
            )
    longest = max(s.shape[0] for s in sequences)
    dtype = jnp.result_type(*sequences)
    padded = jnp.stack(
        [
            jnp.concatenate(
                [s.astype(dtype), jnp.full((longest - s.shape[0], *trailing), padding_value, dtype)]
            )
            for s in sequences
        ]
    )
    return padded if batch_first else jnp.swapaxes(padded, 0, 1)
