"""Layers: the cells scanned over time, stacked, bidirectional, with lengths and dropout.

``lstm``, ``gru`` and ``rnn`` mirror ``torch.nn.LSTM`` / ``GRU`` / ``RNN`` called on a padded batch, or on
a packed one when ``seq_lengths`` is given. Every check of the input happens here, once, at trace time.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jlstm import cells, cudnn, fused, loops, native, pallas
from jlstm import params as P


def _masked(step, carry, inputs):
    """A step that leaves the carry untouched and outputs zeros where ``valid`` is False, so a
    sequence's state freezes after its last element (forward) or stays initial until its last
    element is reached (reverse scan): exactly torch's packed-sequence semantics."""
    xw_t, valid = inputs
    new_carry, y = step(carry, xw_t)
    new_carry = jax.tree.map(lambda new, old: jnp.where(valid, new, old), new_carry, carry)
    return new_carry, jnp.where(valid, y, jnp.zeros_like(y))


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
    concrete = _concrete(lengths)
    if concrete is not None and concrete.size and (concrete.min() < 0 or concrete.max() > length):
        raise ValueError(
            f"{fn}: seq_lengths must lie in [0, {length}] (the padded seq_len), got "
            f"min {concrete.min()} and max {concrete.max()}; pad x to the longest sequence"
        )
    return lengths


def _concrete(lengths) -> np.ndarray | None:
    """The lengths' values, or None when they are traced (unknown at trace time)."""
    try:
        return np.asarray(lengths)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _check_dropout(fn: str, dropout) -> None:
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(
            f"{fn}: dropout must be a float in [0, 1), got {dropout!r}; it is the "
            "probability of zeroing each output of every layer but the last"
        )


IMPLS = ("auto", "native", "fused", "scan", "pallas", "cudnn")


def _check_impl(
    fn: str, kind: str, structure: P.Structure, impl, unroll, checkpoint_every=None
) -> None:
    if impl not in IMPLS:
        raise ValueError(f"{fn}: impl must be one of {IMPLS}, got {impl!r}")
    loops = {
        "fused": "hand-written backward",
        "native": "the C++ CPU loop",
        "pallas": "the Pallas kernels",
    }
    if impl in loops and (kind == "rnn" or structure.proj_size):
        raise ValueError(
            f"{fn}: impl='{impl}' ({loops[impl]}) covers LSTM without proj_size and GRU; "
            f"this is {'an RNN' if kind == 'rnn' else 'an LSTM with proj_size'}: use impl='auto'"
        )
    if impl == "cudnn" and (kind != "lstm" or structure.proj_size):
        what = "an LSTM with proj_size" if kind == "lstm" else f"a {kind.upper()}"
        raise ValueError(
            f"{fn}: impl='cudnn' (jax.experimental.rnn) covers LSTM without proj_size; "
            f"this is {what}: use impl='auto'"
        )
    if impl == "native" and (reason := native.unavailable_reason()) is not None:
        raise ValueError(f"{fn}: impl='native' is not available here: {reason}; use impl='auto'")
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


def _recurrence(kind, w, x, carry, valid, reverse, unroll, hoist=None, impl="fused"):
    """LSTM (without projection) or GRU with a hand-written backward that forms the weight
    gradients in one matmul after the loop: on :mod:`jlstm.native` (the C++ loop, on CPU) when
    ``impl`` is ``"native"``, or ``"auto"`` where it applies, else on :mod:`jlstm.recurrence`.
    ``hoist`` (default: by backend) places the latter's input projection, see there."""
    bias, b_hn = cells.folded_biases(kind, w)
    zeros = jnp.zeros(w.w_hh.shape[:1], x.dtype)
    bias = zeros if bias is None else bias
    b_hn = zeros[: w.w_hh.shape[1]] if b_hn is None else b_hn
    # In x's dtype (the promoted one, see _run): the hand-written backward then returns each
    # gradient in its parameter's own dtype through astype's transpose.
    w_ih, w_hh, bias, b_hn = (a.astype(x.dtype) for a in (w.w_ih, w.w_hh, bias, b_hn))
    if impl == "native" or (impl == "auto" and native.applies(x)):
        loop, speed = native, ()  # the C++ loop has no unroll or hoist
    elif impl == "pallas" or (impl == "auto" and pallas.applies(x, w.w_hh.shape[1])):
        loop, speed = pallas, ()  # one kernel per loop: no unroll, the projection is hoisted
    else:
        # On XLA CPU the input projection runs faster inside the step (see jlstm.recurrence).
        hoist = jax.default_backend() != "cpu" if hoist is None else hoist
        loop, speed = fused, (unroll, hoist)
    if kind == "lstm":
        w_ih, w_hh, bias, x, carry = loops.vary_like((w_ih, w_hh, bias, x, carry))
        ys, h, c = loop.lstm_recurrence(w_ih, w_hh, bias, x, *carry, valid, reverse, *speed)
        return (h, c), ys
    w_ih, w_hh, bias, b_hn, x, carry = loops.vary_like((w_ih, w_hh, bias, b_hn, x, carry))
    ys, h = loop.gru_recurrence(w_ih, w_hh, bias, b_hn, x, carry, valid, reverse, *speed)
    return h, ys


def _segmented(run, carry, xs, valid, reverse, every):
    """``run(carry, xs, valid) -> (carry, ys)`` over the whole sequence, or, with ``every``, as a
    scan over segments of ``every`` steps, each under ``jax.checkpoint``: the backward pass keeps
    only the carry at each segment start and recomputes a segment's forward when it reaches it, so
    activation memory is ``O(L/every + every)`` steps instead of ``O(L)``, for about one extra
    forward pass. A ragged last segment is padded with invalid steps, which leave the carry alone
    (forward and reverse alike) and whose outputs are cut off."""
    length = xs.shape[0]
    if every is None or every >= length:
        return run(carry, xs, valid)
    segments = -(-length // every)
    pad = segments * every - length
    if pad:
        if valid is None:
            valid = jnp.ones((length, *xs.shape[1:-1], 1), bool)
        xs = jnp.concatenate([xs, jnp.zeros((pad, *xs.shape[1:]), xs.dtype)])
        valid = jnp.concatenate([valid, jnp.zeros((pad, *valid.shape[1:]), bool)])

    def split(a):
        return None if a is None else a.reshape(segments, every, *a.shape[1:])

    carry, ys = lax.scan(
        lambda carry, seg: jax.checkpoint(run)(carry, *seg),
        carry,
        (split(xs), split(valid)),
        reverse=reverse,
    )
    return carry, ys.reshape(segments * every, *ys.shape[2:])[:length]


def _direction(
    kind, w, x, carry, valid, reverse, nonlinearity, impl, unroll, hoist=None, every=None
):
    """One direction of one layer over the whole sequence: ``(final carry, outputs)``.

    LSTM (without projection) and GRU run on :func:`_recurrence` unless ``impl="scan"`` asks for
    plain autodiff through ``lax.scan`` over the cell (the reference path; RNN and projected LSTM
    use it). ``every`` recomputes the forward in segments, see :func:`_segmented`.
    """
    if impl != "scan" and (kind == "gru" or (kind == "lstm" and w.w_hr is None)):

        def run(carry, x, valid):
            return _recurrence(kind, w, x, carry, valid, reverse, unroll, hoist, impl)

        return _segmented(run, carry, x, valid, reverse, every)
    carry = loops.vary_like(carry, w, x)
    xw, b_hn = cells.input_projection(kind, w, x)
    step = cells.step_fn(kind, w, b_hn, nonlinearity)

    def run(carry, xw, valid):
        if valid is None:
            return lax.scan(step, carry, xw, reverse=reverse, unroll=unroll)
        return lax.scan(partial(_masked, step), carry, (xw, valid), reverse=reverse, unroll=unroll)

    return _segmented(run, carry, xw, valid, reverse, every)


@partial(
    jax.jit,
    static_argnames=("kind", "dropout", "nonlinearity", "impl", "unroll", "checkpoint_every"),
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
    impl: str,
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
        if impl == "cudnn":  # both directions in one cuDNN call
            rows = slice(layer * len(directions), (layer + 1) * len(directions))
            x, h, c = cudnn.layer(directions, x, state[0][rows], state[1][rows], lengths)
            finals += list(zip(h, c, strict=True))
            x, key = _dropout(x, dropout, key, layer == len(layers) - 1)
            continue
        outputs = []
        for direction, w in enumerate(directions):
            index = layer * len(directions) + direction
            carry = jax.tree.map(lambda s, i=index: s[i], state)
            carry, y = _direction(
                kind,
                w,
                x,
                carry,
                valid,
                direction == 1,
                nonlinearity,
                impl,
                unroll,
                every=checkpoint_every,
            )
            finals.append(carry)
            outputs.append(y)
        x = outputs[0] if len(outputs) == 1 else jnp.concatenate(outputs, axis=-1)
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
    _check_impl(fn, kind, structure, impl, unroll, checkpoint_every)
    x, batched = _check_input(fn, x, structure, batch_first)
    length, batch = x.shape[:2]
    lengths = _check_lengths(fn, seq_lengths, length, batch, batched)
    dtype = jnp.result_type(x, structure.layers[0][0].w_hh)
    backend = jax.default_backend()
    if impl == "native" and (backend != "cpu" or dtype not in native.DTYPES):
        raise ValueError(
            f"{fn}: impl='native' runs float32 or float64 on the CPU backend; this call is "
            f"{jnp.dtype(dtype).name} on {backend}: use impl='auto'"
        )
    reasons = {
        "pallas": lambda: pallas.unavailable_reason(backend, dtype, structure.hidden_size),
        "cudnn": lambda: cudnn.unavailable_reason(backend, dtype, checkpoint_every),
    }
    if impl in reasons and (reason := reasons[impl]()) is not None:
        raise ValueError(f"{fn}: impl='{impl}' cannot run this call: {reason}; use impl='auto'")
    known = None if impl != "cudnn" or lengths is None else _concrete(lengths)
    if known is not None and known.size and known.min() == 0:
        raise ValueError(
            f"{fn}: impl='cudnn' needs every seq_length >= 1 (cuDNN has no empty sequences), got "
            "a 0: drop the empty sequences, or use impl='auto'"
        )
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
        impl=impl,
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
      impl: ``"auto"`` (default: the fastest path that applies), ``"native"`` for the C++ time
        loop of :mod:`jlstm.native` (CPU, float32/float64, LSTM without ``proj_size`` and GRU;
        auto's choice there),
        ``"fused"`` for the ``lax.scan`` loop with the hand-written backward of
        :mod:`jlstm.recurrence` (auto's choice elsewhere, without ``proj_size``), ``"scan"``
        for plain autodiff through ``lax.scan`` over the cell, ``"pallas"`` for the Pallas
        kernels of :mod:`jlstm.pallas` (one kernel per direction's time loop; Triton on CUDA GPUs,
        interpreted on CPU; H <= 256), or ``"cudnn"`` for cuDNN's LSTM through
        ``jax.experimental.rnn`` (:mod:`jlstm.cudnn`; CUDA GPUs, float32, LSTM only, lengths >= 1).
        The last two are opt-in until measured on a GPU (README). All give torch's numbers.
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
