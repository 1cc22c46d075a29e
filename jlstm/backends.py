"""Every implementation of jlstm's time loop, in one table, and how ``impl`` picks one.

==========  ==================================  ===============  ==========================  ========
``impl``    what                                covers           lowers for                  auto
==========  ==================================  ===============  ==========================  ========
``native``  C++ loop on every core              LSTM, GRU;       cpu                         cpu
            (:mod:`jlstm.native`)               f32/f64
``pallas``  one Pallas kernel per direction     LSTM, GRU;       cuda (Triton), cpu          never
            (:mod:`jlstm.pallas`)               f32/f64; H<=256  (interpreted, for tests)    yet
``cudnn``   cuDNN via ``jax.experimental.rnn``  LSTM; f32        cuda                        never
            (:mod:`jlstm.cudnn`)
``fused``   ``lax.scan``, hand-written          LSTM, GRU        every platform              elsewhere
            backward (:mod:`jlstm.fused`)
``scan``    ``lax.scan`` over the cell, plain   everything       every platform              RNN,
            autodiff (the reference)                                                         proj_size
==========  ==================================  ===============  ==========================  ========

(LSTM means without ``proj_size``, except for ``scan``.) The order of :data:`BACKENDS` is auto's
order of preference: on each lowering platform ``impl="auto"`` takes the first entry that lists the
platform in ``auto``, covers the call and is available in this process (:func:`auto_choice`).
Pallas and cuDNN wait for a measurement on a GPU before auto takes them.

The choice is made per **lowering** platform, not per host: a layer traces the branch of every
platform and wraps them in ``jax.lax.platform_dependent``, which lowers only the branch of the
platform being compiled or exported for. A CPU host exporting for ``cuda`` or ``tpu`` thus gets the
``fused`` loop there (no C++ custom call), and ``pallas`` exported for ``cuda`` gets its Triton
kernels, not the interpreter. An explicit ``impl`` that cannot lower for the target raises a
``ValueError`` at lowering time that names the platform and what ``auto`` takes there.

A CPU program that ``jax.export`` lowers is portable: where ``auto`` chose the C++ loop, the
export lowers the ``fused`` loop instead (:func:`jlstm.loops.unless_exported`, which reads JAX's
``for_export`` lowering parameter), so the artifact holds no jlstm custom call and runs without
jlstm; a jitted call keeps the C++ loop. ``impl="native"`` exports the C++ calls on request
(:func:`jlstm.native.export_checks`). Where ``auto`` cannot take the C++ loop on CPU for a call it
covers (no library for this platform, a load failure), :class:`jlstm.native.NativeFallbackWarning`
says so once per process.

Every entry supports every JAX transformation (``grad`` of any order, ``jvp``, ``jacfwd``,
``jacrev``, ``hessian``, ``vmap``, ``shard_map``, ``checkpoint``): see :mod:`jlstm.loops` for how
the fast loops keep their fast first-order backward (cuDNN's call included, :mod:`jlstm.cudnn`).
Adding an implementation is adding an entry to :data:`BACKENDS`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from jlstm import cells, cudnn, fused, loops, native, pallas
from jlstm import params as P

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")  # the lowering platforms; tpu's choice is the default


class Call(NamedTuple):
    """What an implementation must cover: one call of a layer (all its layers and directions)."""

    kind: str  # "lstm", "gru" or "rnn"
    proj_size: int
    dtype: np.dtype  # the computation's (promoted) dtype
    hidden_size: int
    length: int  # seq_len
    checkpoint_every: int | None = None
    seq_lengths: jax.Array | None = None  # read (if concrete) only by entries that care


@dataclasses.dataclass(frozen=True)
class Backend:
    """One implementation of the time loop; see the module docstring for the table."""

    name: str
    what: str  # for messages: "the C++ CPU loop"
    kinds: tuple[str, ...]  # "lstm" (without proj_size), "lstm_proj", "gru", "rnn"
    dtypes: tuple | None  # None: every floating dtype
    max_hidden: int | None
    platforms: tuple[str, ...]  # where it lowers
    auto: tuple[str, ...]  # where auto takes it (if it covers the call and is available)
    # Runs one direction: (kind, w, x, carry, valid, reverse, nonlinearity, unroll, hoist,
    # platform, portable_export) -> (carry, ys); or, with ``layer``, both directions of a layer at
    # once. ``portable_export``: auto chose it, and a jax.export must lower portable code.
    direction: Callable | None = None
    layer: Callable | None = None
    # Both directions of a bidirectional layer at once where it can, besides ``direction``:
    # (kind, directions, x, carries, valid, portable_export) -> (outputs, final carries), or None
    # where it cannot.
    pair: Callable | None = None
    # Why this process cannot run it (e.g. the C++ library did not load), or None.
    process: Callable[[], str | None] = lambda: None
    # Called with that reason when auto, on a platform in ``auto``, skips it for a call it covers
    # (the C++ loop warns that the call runs slower).
    skipped: Callable[[str], None] = lambda reason: None
    # Why it does not cover a call beyond kind, dtype and size, or None.
    covers: Callable[[Call], str | None] = lambda call: None
    # The lowering platforms on which its code differs map to distinct values (fused's input
    # projection, Pallas' interpret mode); one branch is traced per distinct value.
    variant: Callable[[str], object] = lambda platform: None

    def unavailable_reason(self, call: Call) -> str | None:
        """Why this implementation cannot run ``call`` in this process (on any platform), or None.

        >>> import jax.numpy as jnp
        >>> call = Call("rnn", 0, jnp.dtype(jnp.float32), 8, 5)
        >>> BACKENDS["fused"].unavailable_reason(call)
        'it covers LSTM without proj_size and GRU, this is an RNN'
        """
        kind = "lstm_proj" if call.kind == "lstm" and call.proj_size else call.kind
        if kind not in self.kinds:
            return f"it covers {_kinds(self.kinds)}, this is {_KIND_NAMES[kind][1]}"
        if self.dtypes is not None and jnp.dtype(call.dtype) not in self.dtypes:
            names = " or ".join(jnp.dtype(d).name for d in self.dtypes)
            return f"it runs {names}, this call is {jnp.dtype(call.dtype).name}"
        if self.max_hidden is not None and call.hidden_size > self.max_hidden:
            return f"hidden_size {call.hidden_size} is over {self.max_hidden}, the largest it takes"
        if (reason := self.covers(call)) is not None:
            return reason
        if (reason := self.process()) is not None:
            return f"{_NOT_HERE}{reason}"
        return None


_NOT_HERE = "it is not available here: "


_KIND_NAMES = {
    "lstm": ("LSTM without proj_size", "an LSTM"),
    "lstm_proj": ("LSTM with proj_size", "an LSTM with proj_size"),
    "gru": ("GRU", "a GRU"),
    "rnn": ("RNN", "an RNN"),
}


def _kinds(kinds) -> str:
    return " and ".join(_KIND_NAMES[k][0] for k in kinds)


# --------------------------------------------------------------------------------------------
# How each entry runs a direction


def _scan_direction(
    kind, w, x, carry, valid, reverse, nonlinearity, unroll, hoist, platform, portable_export
):
    """Plain autodiff through ``lax.scan`` over the cell (every kind, proj_size included)."""
    del hoist, platform, portable_export
    carry = loops.vary_like(carry, w, x)
    xw, b_hn = cells.input_projection(kind, w, x)
    step = cells.step_fn(kind, w, b_hn, nonlinearity)
    return loops.masked_scan(step, carry, xw, valid, reverse, unroll)


def _loop_weights(kind, w, x):
    """``(w_ih, w_hh, folded bias, b_hn)`` of one direction for a hand-written loop."""
    bias, b_hn = cells.folded_biases(kind, w)
    zeros = jnp.zeros(w.w_hh.shape[:1], x.dtype)
    bias = zeros if bias is None else bias
    b_hn = zeros[: w.w_hh.shape[1]] if b_hn is None else b_hn
    # In x's dtype (the promoted one, see layers._run): the hand-written backward then returns
    # each gradient in its parameter's own dtype through astype's transpose.
    return tuple(a.astype(x.dtype) for a in (w.w_ih, w.w_hh, bias, b_hn))


def _loop_direction(module, kind, w, x, carry, valid, reverse, speed=()):
    """One direction on a hand-written loop of ``module`` (LSTM without projection, or GRU)."""
    w_ih, w_hh, bias, b_hn = _loop_weights(kind, w, x)
    if kind == "lstm":
        w_ih, w_hh, bias, x, carry = loops.vary_like((w_ih, w_hh, bias, x, carry))
        ys, h, c = module.lstm_recurrence(w_ih, w_hh, bias, x, *carry, valid, reverse, *speed)
        return (h, c), ys
    w_ih, w_hh, bias, b_hn, x, carry = loops.vary_like((w_ih, w_hh, bias, b_hn, x, carry))
    ys, h = module.gru_recurrence(w_ih, w_hh, bias, b_hn, x, carry, valid, reverse, *speed)
    return h, ys


def _fused_direction(
    kind, w, x, carry, valid, reverse, nonlinearity, unroll, hoist, platform, portable_export
):
    # On XLA CPU the input projection runs faster inside the step (see jlstm.fused).
    hoist = platform != "cpu" if hoist is None else hoist
    return _loop_direction(fused, kind, w, x, carry, valid, reverse, (unroll, hoist))


def _native_direction(
    kind, w, x, carry, valid, reverse, nonlinearity, unroll, hoist, platform, portable_export
):
    # No unroll or hoist; exported, auto's choice lowers the fused loop (see the module docstring).
    speed = (portable_export,)
    return _loop_direction(native, kind, w, x, carry, valid, reverse, speed)


def _native_pair(kind, directions, x, carries, valid, portable_export):
    """Both directions of a bidirectional layer in one C++ call (``native.lstm_bidirectional``,
    ``native.gru_bidirectional``): ``(outputs (L, N, 2H), final carries)``; None for one
    direction."""
    if len(directions) != 2:
        return None
    weights = [_loop_weights(kind, w, x) for w in directions]
    if kind == "lstm":  # no b_hn; the carry is (h, c)
        arrays = [(*w[:3], *carry) for w, carry in zip(weights, carries, strict=True)]
    else:
        arrays = [(*w, carry) for w, carry in zip(weights, carries, strict=True)]
    *arrays, x = loops.vary_like((*arrays, x))
    both = native.lstm_bidirectional if kind == "lstm" else native.gru_bidirectional
    (ys_f, *final_f), (ys_b, *final_b) = both(*arrays, x, valid, portable_export)
    if kind == "lstm":
        finals = [tuple(final_f), tuple(final_b)]
    else:
        finals = [final_f[0], final_b[0]]
    return jnp.concatenate([ys_f, ys_b], axis=-1), finals


def _pallas_direction(
    kind, w, x, carry, valid, reverse, nonlinearity, unroll, hoist, platform, portable_export
):
    compiled = platform == "cuda"  # Triton on CUDA, interpreted elsewhere
    return _loop_direction(pallas, kind, w, x, carry, valid, reverse, (compiled,))


def _native_skipped(reason: str) -> None:
    """Where auto cannot take the C++ loop on CPU for a call it covers: say so, once."""
    native.warn_fallback("loop", reason)


def _cudnn_process() -> str | None:
    from jaxlib import gpu_rnn

    if not hasattr(gpu_rnn, "compute_rnn_workspace_reserve_space_sizes"):
        return "this jaxlib has no cuDNN RNN support (it comes with JAX's CUDA plugin)"
    return None


def _cudnn_covers(call: Call) -> str | None:
    if call.checkpoint_every is not None:
        return "cuDNN keeps its own activations, so checkpoint_every cannot segment them"
    known = None if call.seq_lengths is None else known_values(call.seq_lengths)
    if known is not None and known.size and known.min() == 0:
        return "cuDNN has no empty sequences, every seq_length must be >= 1 but one is 0"
    return None


def known_values(a) -> np.ndarray | None:
    """``a``'s values, or None when it is traced (unknown at trace time).

    >>> import jax.numpy as jnp
    >>> known_values(jnp.arange(3))
    array([0, 1, 2], dtype=int32)
    """
    try:
        return np.asarray(a)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


_LOOPS = ("lstm", "gru")
_FLOATS = (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64))

BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend(
            "native",
            "the C++ CPU loop",
            kinds=_LOOPS,
            dtypes=_FLOATS,
            max_hidden=None,
            platforms=("cpu",),
            auto=("cpu",),
            direction=_native_direction,
            pair=_native_pair,
            process=lambda: native.unavailable_reason(),  # looked up per call: tests replace it
            skipped=_native_skipped,
            covers=lambda call: "the sequence is empty (seq_len 0)" if call.length == 0 else None,
        ),
        Backend(
            "pallas",
            "the Pallas kernels",
            kinds=_LOOPS,
            dtypes=_FLOATS,
            max_hidden=pallas.MAX_HIDDEN,
            platforms=("cuda", "cpu"),
            auto=(),  # until measured against the fused loop on a GPU (README, "GPU")
            direction=_pallas_direction,
            variant=lambda platform: platform == "cuda",
        ),
        Backend(
            "cudnn",
            "cuDNN through jax.experimental.rnn",
            kinds=("lstm",),
            dtypes=(jnp.dtype(jnp.float32),),
            max_hidden=None,
            platforms=("cuda",),
            auto=(),  # until measured on a GPU
            layer=cudnn.layer,
            process=_cudnn_process,
            covers=_cudnn_covers,
        ),
        Backend(
            "fused",
            "lax.scan with the hand-written backward",
            kinds=_LOOPS,
            dtypes=None,
            max_hidden=None,
            platforms=PLATFORMS,
            auto=PLATFORMS,
            direction=_fused_direction,
            variant=lambda platform: platform == "cpu",
        ),
        Backend(
            "scan",
            "plain autodiff through lax.scan over the cell",
            kinds=("lstm", "lstm_proj", "gru", "rnn"),
            dtypes=None,
            max_hidden=None,
            platforms=PLATFORMS,
            auto=PLATFORMS,
            direction=_scan_direction,
        ),
    )
}

IMPLS = ("auto", *BACKENDS)


def auto_choice(platform: str, call: Call) -> str:
    """The implementation ``impl="auto"`` takes for ``call`` when lowering for ``platform``.

    >>> import jax.numpy as jnp
    >>> call = Call("lstm", 0, jnp.dtype(jnp.float32), 64, 28)
    >>> auto_choice("tpu", call), auto_choice("cuda", call._replace(kind="rnn"))
    ('fused', 'scan')
    """
    for backend in BACKENDS.values():
        if platform not in backend.auto:
            continue
        reason = backend.unavailable_reason(call)
        if reason is None:
            return backend.name
        if reason.startswith(_NOT_HERE):
            backend.skipped(reason.removeprefix(_NOT_HERE))
    raise AssertionError(f"no implementation covers {call}")  # scan covers everything


class Choice(NamedTuple):
    """The implementation of each lowering platform (the last is every other's), and, for an
    explicit ``impl``, the error to raise when lowering for a platform it does not lower for."""

    names: tuple[tuple[str, str], ...]  # (platform, impl) for each of PLATFORMS
    refusals: tuple[tuple[str, str], ...] = ()  # (platform, message)
    # impl="auto": a jax.export lowers portable code (the fused loop for the C++ one).
    portable_export: bool = False


def resolve(fn: str, impl, call: Call) -> Choice:
    """Checks ``impl`` for ``call`` and returns what runs on each lowering platform.

    Raises ``ValueError`` (naming ``fn``) for an unknown ``impl`` or one that cannot run the call.

    >>> import jax.numpy as jnp
    >>> call = Call("gru", 0, jnp.dtype(jnp.float32), 64, 28)
    >>> dict(resolve("gru", "fused", call).names)["cuda"]
    'fused'
    """
    if impl not in IMPLS:
        raise ValueError(f"{fn}: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return Choice(tuple((p, auto_choice(p, call)) for p in PLATFORMS), portable_export=True)
    backend = BACKENDS[impl]
    if (reason := backend.unavailable_reason(call)) is not None:
        raise ValueError(
            f"{fn}: impl='{impl}' ({backend.what}) cannot run this call: {reason}; use impl='auto'"
        )
    refusals = tuple(
        (
            p,
            f"{fn}: impl='{impl}' ({backend.what}) does not lower for {p}; it lowers for "
            f"{', '.join(backend.platforms)}: use impl='auto' (on {p}: "
            f"impl='{auto_choice(p, call)}')",
        )
        for p in PLATFORMS
        if p not in backend.platforms
    )
    return Choice(tuple((p, impl) for p in PLATFORMS), refusals)


# --------------------------------------------------------------------------------------------
# Running a layer on the choice of each lowering platform


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


def direction(
    impl: str,
    kind: str,
    w: P.Weights,
    x: jax.Array,
    carry,
    valid: jax.Array | None,
    reverse: bool,
    *,
    nonlinearity: str = "tanh",
    unroll: int = 1,
    hoist: bool | None = None,
    every: int | None = None,
    platform: str = "cpu",
    portable_export: bool = False,
):
    """One direction of one layer on ``impl``'s code for ``platform``: ``(final carry, outputs)``.

    ``x`` is ``(L, N, I)``, ``carry`` ``(h, c)`` or ``h`` of ``(N, ·)``, ``valid`` ``(L, N, 1)``
    bool or None. ``hoist`` places the fused loop's input projection (default: by platform);
    ``every`` recomputes the forward in segments of that many steps (``checkpoint_every``);
    ``portable_export`` lowers the fused loop instead of the C++ one for ``jax.export``.

    >>> import jax, jax.numpy as jnp, jlstm
    >>> from jlstm import params
    >>> p = jlstm.init_gru(jax.random.key(0), 3, 4)
    >>> w = params.layer_structure("gru", "gru", p).layers[0][0]
    >>> h, ys = direction("fused", "gru", w, jnp.ones((5, 2, 3)), jnp.zeros((2, 4)), None, False)
    >>> ys.shape
    (5, 2, 4)
    """
    run_one = BACKENDS[impl].direction

    def run(carry, x, valid):
        return run_one(
            kind,
            w,
            x,
            carry,
            valid,
            reverse,
            nonlinearity,
            unroll,
            hoist,
            platform,
            portable_export,
        )

    return _segmented(run, carry, x, valid, reverse, every)


def layer(
    choice: Choice,
    kind: str,
    directions: tuple[P.Weights, ...],
    x: jax.Array,
    carries: list,
    valid: jax.Array | None,
    lengths: jax.Array | None,
    *,
    nonlinearity: str,
    unroll: int,
    every: int | None,
):
    """Both directions of one layer on ``choice``'s implementation for each lowering platform:
    ``(outputs (L, N, D*H_out), final carries)``. One branch per distinct implementation is
    traced; ``jax.lax.platform_dependent`` lowers only the target's."""

    def on(platform):
        backend = BACKENDS[dict(choice.names)[platform]]

        def run(x, carries):
            if backend.layer is not None:  # cuDNN: both directions in one call
                y, h, c = backend.layer(
                    directions, x, *map(jnp.stack, zip(*carries, strict=True)), lengths
                )
                return y, list(zip(h, c, strict=True))
            if backend.pair is not None and (every is None or every >= x.shape[0]):
                both = backend.pair(kind, directions, x, carries, valid, choice.portable_export)
                if both is not None:
                    return both
            outs, finals = [], []
            for d, (w, carry) in enumerate(zip(directions, carries, strict=True)):
                carry, y = direction(
                    backend.name,
                    kind,
                    w,
                    x,
                    carry,
                    valid,
                    d == 1,
                    nonlinearity=nonlinearity,
                    unroll=unroll,
                    every=every,
                    platform=platform,
                    portable_export=choice.portable_export,
                )
                finals.append(carry)
                outs.append(y)
            return (outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=-1)), finals

        return backend, run

    if choice.refusals:
        x = _guard(x, choice.refusals)
    branches, by_platform = {}, {}
    for platform in PLATFORMS:
        backend, run = on(platform)
        key = (backend.name, backend.variant(platform))
        by_platform[platform] = branches.setdefault(key, run)
    if len(branches) == 1:
        return next(iter(branches.values()))(x, carries)
    *named, default = PLATFORMS
    return lax.platform_dependent(
        x, carries, default=by_platform[default], **{p: by_platform[p] for p in named}
    )


# --------------------------------------------------------------------------------------------
# Refusing to lower an explicit impl for a platform it does not lower for


_guard_p = Primitive("jlstm_impl_guard")
_guard_p.def_impl(lambda x, **_: x)
_guard_p.def_abstract_eval(lambda aval, **_: aval)
ad.primitive_jvps[_guard_p] = lambda primals, tangents, **p: (
    _guard_p.bind(*primals, **p),
    tangents[0],
)
batching.primitive_batchers[_guard_p] = lambda args, dims, **p: (_guard_p.bind(*args, **p), dims[0])


def _guard_lowering(ctx, x, *, refusals, platform):
    del ctx
    message = dict(refusals).get(platform)
    if message is not None:
        raise ValueError(message)
    return [x]


for _platform in PLATFORMS:
    mlir.register_lowering(_guard_p, partial(_guard_lowering, platform=_platform), _platform)
mlir.register_lowering(_guard_p, lambda ctx, x, **_: [x])


def _guard(x, refusals):
    """``x``, with lowering for a platform in ``refusals`` raising that platform's message."""
    return _guard_p.bind(x, refusals=refusals)
