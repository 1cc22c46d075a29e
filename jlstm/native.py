"""The LSTM and GRU time loops on XLA CPU as C++ custom calls that run each step on every core.

XLA CPU runs a ``lax.scan`` body on one core: a step of a small recurrent layer is too little work
for its thread pool. ``csrc/recurrence.cc`` runs the loop in C++ instead, splitting the hidden units
over threads with small GEMMs per thread and step and one barrier per step, as oneDNN does (see
the file's header). This module compiles it on first use with the machine's C++ compiler against
JAX's FFI headers (nothing else), caches the library under ``$JLSTM_CACHE`` (default
``~/.cache/jlstm``), registers it with XLA, and wraps it as :func:`lstm_recurrence` and
:func:`gru_recurrence`, the same functions as in :mod:`jlstm.fused`, each with a hand-written
backward: the C++ backward loop, which also sums the weight gradients while they fit
(:data:`WEIGHTS_IN_LOOP_BYTES`), else hands the gate gradients to whole-sequence GEMMs (OpenBLAS's,
run by the C++ team, :data:`BLAS_GEMMS`, or XLA's); and
as :func:`lstm_bidirectional` and :func:`gru_bidirectional`, both directions of a bidirectional
layer in one call, side by side, at inference.

``python -m jlstm.native`` builds it and reports; :func:`available` says whether it can be used.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jlstm import loops
from jlstm.loops import input_grads, like, outputs, previous, weight_grad

SOURCE = Path(__file__).parent / "csrc" / "recurrence.cc"
HEADERS = (SOURCE.parent / "gate_math.h",)  # included by SOURCE
# -mprefer-vector-width=512: where the CPU has AVX-512, GCC's -march=native tuning may still
# vectorise loops at 256 bits (as on an Intel Xeon, Sapphire Rapids class), the gate loops too.
# At 512 bits the gates' tanh, then libmvec's tanhf (float32 now computes its own,
# csrc/gate_math.h), fell from 3.6 % to 1.8 % of the samples in `perf record` profiles of the wide
# forward (experiments.perf.profile_case). Ignored without AVX-512.
# -fno-trapping-math: GCC then if-converts the selects of csrc/gate_math.h and vectorises the gate
# loops (it changes no value: only whether FP exception flags may be raised by operations whose
# results are discarded).
FLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-fno-math-errno", "-fopenmp-simd")
FLAGS += ("-fno-trapping-math",)
FLAGS += ("-std=c++20", "-shared", "-fPIC", "-pthread")
# JLSTM_CXXFLAGS: more compiler flags, after these (e.g. "-mno-avx512f" builds the AVX2 kernels on
# a CPU with AVX-512, as tests/test_native.py does to check them); part of the library's cache key.
FLAGS += tuple(os.environ.get("JLSTM_CXXFLAGS", "").split())
DTYPES = (jnp.float32, jnp.float64)
# The custom-call targets in csrc/recurrence.cc, registered as jlstm_<name> (symbol Jlstm<Name>).
TARGETS = (
    "lstm_forward",
    "lstm_inference",
    "lstm_inference_pair",
    "lstm_backward",
    "lstm_backward_gates",
    "gru_forward",
    "gru_inference_pair",
    "gru_backward",
    "gru_backward_gates",
    "sequence_grads",
)


class NativeUnavailable(RuntimeError):
    """The C++ recurrence could not be built or loaded; the message says why."""


def _cpu_id() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _library_path() -> Path:
    key = hashlib.sha256()
    sources = [p.read_bytes() for p in (SOURCE, *HEADERS)]
    for part in (*sources, " ".join(FLAGS).encode(), jax.ffi.include_dir().encode()):
        key.update(part)
    key.update(f"{jax.__version__} {_cpu_id()}".encode())
    cache = Path(os.environ.get("JLSTM_CACHE", Path.home() / ".cache" / "jlstm"))
    return cache / f"recurrence-{key.hexdigest()[:16]}.so"


def build(verbose: bool = False) -> Path:
    """Compiles ``csrc/recurrence.cc`` into the cache (once per source, flags, JAX and CPU) and
    returns the library's path. Raises :class:`NativeUnavailable` with the reason."""
    out = _library_path()
    if out.exists():
        return out
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise NativeUnavailable(f"no C++ compiler ({compiler!r}) on PATH to build the native LSTM")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        partial = Path(tmp) / out.name
        cmd = [
            compiler,
            *FLAGS,
            f"-I{jax.ffi.include_dir()}",
            str(SOURCE),
            "-lmvec",
            "-o",
            str(partial),
        ]
        if verbose:
            print(" ".join(cmd), file=sys.stderr)
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise NativeUnavailable(f"building {SOURCE.name} failed:\n{done.stderr[-4000:]}")
        os.replace(partial, out)  # atomic: concurrent builders (test workers) all end up valid
    return out


@functools.cache
def _load() -> ctypes.CDLL:
    library = ctypes.CDLL(str(build()))
    for name in TARGETS:
        symbol = "Jlstm" + name.title().replace("_", "")
        target = jax.ffi.pycapsule(getattr(library, symbol))
        jax.ffi.register_ffi_target(f"jlstm_{name}", target, platform="cpu")
    return library


def blas_unavailable_reason() -> str | None:
    """None if the backward's whole-sequence GEMMs can go to OpenBLAS (see :data:`BLAS_GEMMS`),
    else why not (loads it on the first call). The BLAS is the ``scipy-openblas32`` wheel (a
    dependency on Linux x86-64), the OpenBLAS build NumPy and SciPy are built against, under its own
    symbol names; it is set to one thread (the C++ team splits the work and calls it from each
    member), which affects nobody else in the process unless they load that same wheel.

    >>> blas_unavailable_reason() is None or isinstance(blas_unavailable_reason(), str)
    True
    """
    return _load_blas()


@functools.cache
def _load_blas() -> str | None:
    """Hands OpenBLAS's GEMMs to the C++ library once; None, or why it could not."""
    try:
        import scipy_openblas32
    except ImportError:
        return "scipy-openblas32 is not installed (pip install scipy-openblas32)"
    path = Path(scipy_openblas32.get_lib_dir()) / scipy_openblas32.get_library(fullname=True)
    try:
        blas = ctypes.CDLL(str(path))
        sgemm, dgemm = blas.scipy_cblas_sgemm, blas.scipy_cblas_dgemm
        blas.scipy_openblas_set_num_threads(1)
    except (OSError, AttributeError) as e:
        return f"cannot use {path}: {e}"
    address = lambda f: ctypes.cast(f, ctypes.c_void_p)  # noqa: E731
    _load().JlstmUseBlas(address(sgemm), address(dgemm))
    return None


@functools.cache
def unavailable_reason() -> str | None:
    """None if the native loops are built and registered, else why not (built on first call)."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"the native loops are built for Linux x86-64 only, this is {platform.platform()}"
    try:
        _load()
    except (NativeUnavailable, OSError) as e:
        return str(e)
    return None


def available() -> bool:
    """Whether the native loops can run here (builds the library on the first call)."""
    return unavailable_reason() is None


def export_checks() -> list:
    """What ``jax.export`` must be told to export a CPU program that calls the C++ loops:
    ``export.export(f, platforms=["cpu"], disabled_checks=native.export_checks())``. Custom calls
    outside JAX have no compatibility guarantee, so the loading side must run the same jlstm (and
    have imported :mod:`jlstm.native` and called :func:`available`, which registers the targets)
    before calling the deserialized function.

    >>> len(export_checks()) == len(TARGETS)
    True
    """
    from jax import export

    return [export.DisabledSafetyCheck.custom_call(f"jlstm_{name}") for name in TARGETS]


def _valid_bytes(valid):
    """``valid (L, N, 1)`` bool as the ``(L, N)`` bytes the kernel reads; a 1-byte dummy if None."""
    if valid is None:
        return jnp.zeros((1,), jnp.uint8)
    return valid[..., 0].astype(jnp.uint8)


def _call(name, outs, *args, valid, reverse, aliases=None):
    return jax.ffi.ffi_call(
        f"jlstm_{name}", outs, vmap_method="sequential", input_output_aliases=aliases
    )(
        *args,
        _valid_bytes(valid),
        reverse=np.int64(reverse),
        masked=np.int64(valid is not None),
    )


def _forward(w_ih, w_hh, bias, x, h0, c0, valid, reverse, save):
    """The loop (each step's input projection inside it). With ``save``, also what the backward
    needs."""
    _load()
    length, batch, hidden = x.shape[0], x.shape[1], h0.shape[-1]
    seq, state, gates = (
        like(shape, x)
        for shape in ((length, batch, hidden), (batch, hidden), (length, batch, 4 * hidden))
    )
    outs = (seq, state, seq, gates) if save else (seq, state)
    hs, c_n, *saved = _call(
        "lstm_forward" if save else "lstm_inference",
        outs,
        *(x, w_ih, w_hh, bias, h0, c0),
        valid=valid,
        reverse=reverse,
    )
    return (*outputs(hs, valid, reverse), c_n), (hs, *saved)


# A thread's rows of the weight gradients (4H/threads x (I + H)) are summed inside the backward loop
# up to this many bytes; beyond, the loop hands out every step's gate gradients and XLA forms the
# weight gradients as large GEMMs on every core. Measured 2026-11-22 on a 2-core AMD EPYC (Zen 4)
# by setting this limit to 0 against the default: handing the gates to XLA made a train step 1.64x
# slower on mnist (47 KB of rows per thread) and 1.41x on long (196 KB), and changed nothing on
# medium (up to 1.5 MB) or wide (12.6 MB, past the limit). Rows that outgrow the caches are
# streamed from memory every step, while XLA's GEMMs keep scaling with cores, hence a limit. Any
# batch: the loop adds a small batch's gate gradients in groups of steps (accumulation_group in the
# C++ source), so a batch of 1 or 2 no longer reads and writes the rows for one or two
# multiply-adds per step (`python -m experiments.perf.backward_batch 1,2 256`, BENCHMARKS.md).
WEIGHTS_IN_LOOP_BYTES = 2 * 1024 * 1024

# Gates out, the LSTM backward writes its gate gradients over the saved gates (an input-output
# alias: a step's in place, each thread over the gates it has just read): the train step allocates
# one (L, N, 4H) buffer fewer. On wide (128 x 64 x 512 -> 1024) XLA's temporaries fall from 352 to
# 224 MiB and the step took 0.78-0.95 of its time in 4 alternating rounds (`python -m
# experiments.perf.saved_gates wide`, BENCHMARKS.md). False: a buffer of their own, for that script.
OVERWRITE_SAVED_GATES = True


# The weight gradients past WEIGHTS_IN_LOOP_BYTES are XLA GEMMs over the whole sequence, sum_t d_t^T
# v_t. Where the CPU has no AVX-512, XLA CPU (jaxlib 0.10.2) runs them faster with v's transpose
# written out first (loops.weight_grad's transpose_first) than folded into the dot on large gate
# counts. `python -m experiments.perf.weight_gemm` on a 2-core AMD EPYC (Zen 3, AVX2 only),
# 2026-12-02 19:22 UTC, time of the copy form over the folded one at (L*N, K, G): (8192, 1024,
# 4096) 0.57, (8192, 512, 4096) 0.54, (16384, 2048, 8192) 0.54, (1024, 1024, 4096) 0.58, (4096,
# 512, 1024) 0.94, (4096, 256, 1024) 0.99, (2048, 128, 512) 0.84, but (65536, 64, 512) 1.43. With
# AVX-512 (a Xeon, Sapphire Rapids class) the folded form stays: there the other folded form,
# d^T v, gained nothing, and the copy has not been measured. Read once, from the flags the C++
# loop is built for (x86 with AVX2 but not AVX-512).
_FLAGS = set(_cpu_id().split())
TRANSPOSE_FIRST = "avx2" in _FLAGS and "avx512f" not in _FLAGS


# A backward that hands its gate gradients out (past WEIGHTS_IN_LOOP_BYTES) forms dW_ih, dW_hh and
# dx with OpenBLAS's GEMMs, called by the C++ team on shares of the output (csrc/recurrence.cc,
# sequence_grads), rather than with XLA's dots, where OpenBLAS loads (blas_unavailable_reason). It
# also reads h_{t-1} and the transposes in place instead of copying them. `python -m
# experiments.perf.sequence_gemms wide` on a 2-core AMD EPYC (Zen 3, AVX2), 2026-12-03: the wide
# case's three GEMMs at 142-174 GFLOP/s against 122-149 XLA's way (0.80-0.86 of the time), the
# train step in 0.88-0.96 of the time and 192.5 MiB of XLA temporaries against 224.5
# (BENCHMARKS.md). On the 2-core Xeon of BENCHMARKS.md, NumPy's OpenBLAS ran the same shapes at
# 298-380 GFLOP/s against XLA's 293-344 (not measured through this path). False: XLA's dots.
BLAS_GEMMS = True


def _threads() -> int:
    env = os.environ.get("JLSTM_NATIVE_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else len(os.sched_getaffinity(0))


def weights_in_loop(x, w_hh) -> bool:
    """Whether the backward loop forms the weight gradients itself (see WEIGHTS_IN_LOOP_BYTES);
    ``x`` is ``(L, N, I)``, ``w_hh`` is ``(G*H, H)`` for G gates.

    >>> w_hh = jnp.zeros((4 * 256, 256))
    >>> [weights_in_loop(jnp.zeros((128, n, 64)), w_hh) for n in (1, 16)]
    [True, True]
    >>> weights_in_loop(jnp.zeros((2, 1, 16384)), jnp.zeros((4 * 1024, 1024)))
    False
    """
    gates, hidden = w_hh.shape
    rows = gates / min(_threads(), max(1, hidden // 16))
    return rows * (x.shape[-1] + hidden) * x.dtype.itemsize <= WEIGHTS_IN_LOOP_BYTES


def after_the_loop(*arrays):
    """``arrays``, for XLA's whole-sequence work after a backward loop (``previous``, transposes,
    GEMMs), held until the loop's outputs among them exist. XLA CPU runs independent ops side by
    side: a copy started beside the loop takes a pool thread that the loop's team then goes without
    (a helper that cannot start is left out, see csrc/recurrence.cc), and the whole loop runs on one
    core. On a 2-core Zen 3 EPYC the wide train step took 3308 ms unheld (1.64 cores busy), 2674
    held (1.97), its saving forward and backward apart 990 + 1861 ms (`python -m
    experiments.perf.train_parts wide`, 2026-12-02)."""
    return jax.lax.optimization_barrier(arrays)


def _dx_shape(x, needed: bool) -> tuple:
    """The shape of the in-loop backward's dx result: x's, or (0,) when nothing needs dx (the C++
    loop then skips its GEMM, dgates_t @ W_ih, every step)."""
    return x.shape if needed else (0,)


def _blas_gemms(x, w_hh) -> bool:
    """Whether a gates-out backward's whole-sequence GEMMs go to OpenBLAS (:data:`BLAS_GEMMS`):
    where it loads and the sizes fit its 32-bit integers."""
    rows, largest = x.shape[0] * x.shape[1], max(x.shape[-1], *w_hh.shape)
    return BLAS_GEMMS and rows * largest < 2**31 and blas_unavailable_reason() is None


def _sequence_grads(d_in, d_h, x, hs, h0, w_ih, reverse, needed_dx):
    """``(dW_ih, dW_hh, dx)`` from every step's gate gradients through W_ih (``d_in``) and W_hh
    (``d_h``), by the C++ team's OpenBLAS calls; dx None when not ``needed_dx``."""
    reason = _load_blas()  # the library's GEMMs must have been handed in, as _load() registers
    if reason is not None:
        raise NativeUnavailable(reason)
    outs = (like(w_ih.shape, x), like((w_ih.shape[0], h0.shape[-1]), x))
    outs += (like(_dx_shape(x, needed_dx), x),)
    dw_ih, dw_hh, dx = jax.ffi.ffi_call("jlstm_sequence_grads", outs, vmap_method="sequential")(
        d_in, d_h, x, hs, h0, w_ih, reverse=np.int64(reverse)
    )
    return dw_ih, dw_hh, dx if needed_dx else None


def _bwd(reverse, residuals, cotangents, needed):
    w_ih, w_hh, _, x, h0, c0, valid, (hs, cs, acts) = residuals
    dys, dh_n, dc_n = cotangents
    inputs = (x, w_ih, w_hh, acts, cs, hs, h0, c0, dys, dh_n, dc_n)
    if weights_in_loop(x, w_hh):
        outs = (
            like(_dx_shape(x, needed[3]), x),
            *(like(a.shape, x) for a in (w_ih, w_hh, w_hh[:, 0], h0, c0)),
        )
        dx, dw_ih, dw_hh, dbias, dh0, dc0 = _call(
            "lstm_backward", outs, *inputs, valid=valid, reverse=reverse
        )
        return dw_ih, dw_hh, dbias, dx if needed[3] else None, dh0, dc0, None
    outs = tuple(like(a.shape, x) for a in (acts, h0, c0))
    aliases = {3: 0} if OVERWRITE_SAVED_GATES else None  # inputs[3], acts, becomes dgates
    dgates, dh0, dc0 = _call(
        "lstm_backward_gates", outs, *inputs, valid=valid, reverse=reverse, aliases=aliases
    )
    if _blas_gemms(x, w_hh):
        dw_ih, dw_hh, dx = _sequence_grads(dgates, dgates, x, hs, h0, w_ih, reverse, needed[3])
        return dw_ih, dw_hh, jnp.sum(dgates, axis=(0, 1)), dx, dh0, dc0, None
    x, hs, dgates = after_the_loop(x, hs, dgates)
    dw_ih, dbias, dx = input_grads(dgates, x, w_ih, TRANSPOSE_FIRST)
    hs_prev = previous(hs, h0, reverse)
    return dw_ih, weight_grad(dgates, hs_prev, TRANSPOSE_FIRST), dbias, dx, dh0, dc0, None


lstm_recurrence = loops.loop_with_backward(
    _forward,
    _bwd,
    loops.lstm_reference,
    """``(ys, h_n, c_n)`` of one LSTM direction without projection, as
    :func:`jlstm.fused.lstm_recurrence` (same arguments, no ``unroll``/``hoist``).""",
)


# --------------------------------------------------------------------------------------------
# GRU


def _gru_forward(w_ih, w_hh, bias, b_hn, x, h0, valid, reverse, save):
    """The loop; with ``save`` also every step's [r | z | n | W_hn h + b_hn] for the backward."""
    _load()
    length, batch, hidden = x.shape[0], x.shape[1], h0.shape[-1]
    acts = (length, batch, 4 * hidden) if save else (0,)  # empty: the kernel saves nothing
    hs, acts = _call(
        "gru_forward",
        (like((length, batch, hidden), x), like(acts, x)),
        *(x, w_ih, w_hh, bias, b_hn, h0),
        valid=valid,
        reverse=reverse,
    )
    return outputs(hs, valid, reverse), (hs, acts)


def _gru_bwd(reverse, residuals, cotangents, needed):
    w_ih, w_hh, _, _, x, h0, valid, (hs, acts) = residuals
    dys, dh_n = cotangents
    inputs = (x, w_ih, w_hh, acts, hs, h0, dys, dh_n)
    if weights_in_loop(x, w_hh):
        outs = (
            like(_dx_shape(x, needed[4]), x),
            *(like(a.shape, x) for a in (w_ih, w_hh, w_hh[:, 0], h0[0], h0)),
        )
        dx, dw_ih, dw_hh, dbias, db_hn, dh0 = _call(
            "gru_backward", outs, *inputs, valid=valid, reverse=reverse
        )
        return dw_ih, dw_hh, dbias, db_hn, dx if needed[4] else None, dh0, None
    gates = like((*x.shape[:2], w_hh.shape[0]), x)
    dxw, dhw, dh0 = _call(
        "gru_backward_gates",
        (gates, gates, like(h0.shape, x)),
        *inputs,
        valid=valid,
        reverse=reverse,
    )
    db_hn = jnp.sum(dhw[..., 2 * h0.shape[-1] :], axis=(0, 1))
    if _blas_gemms(x, w_hh):
        dw_ih, dw_hh, dx = _sequence_grads(dxw, dhw, x, hs, h0, w_ih, reverse, needed[4])
        return dw_ih, dw_hh, jnp.sum(dxw, axis=(0, 1)), db_hn, dx, dh0, None
    x, hs, dxw, dhw = after_the_loop(x, hs, dxw, dhw)
    dw_ih, dbias, dx = input_grads(dxw, x, w_ih, TRANSPOSE_FIRST)
    dw_hh = weight_grad(dhw, previous(hs, h0, reverse), TRANSPOSE_FIRST)
    return dw_ih, dw_hh, dbias, db_hn, dx, dh0, None


gru_recurrence = loops.loop_with_backward(
    _gru_forward,
    _gru_bwd,
    loops.gru_reference,
    """``(ys, h_n)`` of one GRU direction, as :func:`jlstm.fused.gru_recurrence` (same
    arguments, no ``unroll``/``hoist``).""",
)


# --------------------------------------------------------------------------------------------
# Both directions of a bidirectional layer in one call: at inference the C++ team splits in two
# and runs them side by side (csrc/recurrence.cc, run_forward). Any derivative takes each direction's
# own loop (lstm_recurrence, gru_recurrence), so gradients, JVPs and their memory are those of two
# separate directions.


def _bidirectional(kind, recurrence, states):
    @jax.custom_jvp
    def both(forward, backward, x, valid):
        _load()
        length, batch, hidden = x.shape[0], x.shape[1], forward[-1].shape[-1]
        outs = (like((length, batch, hidden), x),) + (like((batch, hidden), x),) * (states - 1)
        results = jax.ffi.ffi_call(
            f"jlstm_{kind}_inference_pair", outs * 2, vmap_method="sequential"
        )(x, *forward, *backward, _valid_bytes(valid), masked=np.int64(valid is not None))
        f, b = results[: len(outs)], results[len(outs) :]
        return (*outputs(f[0], valid, False), *f[1:]), (*outputs(b[0], valid, True), *b[1:])

    @both.defjvp
    def _jvp(primals, tangents):
        forward, backward, x, valid = primals
        d_forward, d_backward, dx, _ = tangents

        def one(arrays, x, reverse):
            weights, carry = arrays[:-states], arrays[-states:]
            return recurrence(*weights, x, *carry, valid, reverse)

        out_f, t_f = jax.jvp(lambda a, x: one(a, x, False), (forward, x), (d_forward, dx))
        out_b, t_b = jax.jvp(lambda a, x: one(a, x, True), (backward, x), (d_backward, dx))
        return (out_f, out_b), (t_f, t_b)

    both.__doc__ = f"""``(forward direction's, reverse direction's)`` results of one bidirectional
    {kind.upper()} layer, each as :func:`{kind}_recurrence` gives them with ``reverse`` False and
    True. ``forward`` and ``backward`` hold each direction's arguments but ``x`` and ``valid`` in
    :func:`{kind}_recurrence`'s order (weights, then the initial state); ``x (L, N, I)`` and
    ``valid (L, N, 1)`` bool or None are shared."""
    return both


lstm_bidirectional = _bidirectional("lstm", lstm_recurrence, states=2)
gru_bidirectional = _bidirectional("gru", gru_recurrence, states=1)


def main() -> None:
    """``python -m jlstm.native``: build (if needed), load, and say where the library is."""
    reason = unavailable_reason()
    if reason is not None:
        sys.exit(f"jlstm.native: unavailable: {reason}")
    print(f"jlstm.native: {_library_path()}")


if __name__ == "__main__":
    main()
