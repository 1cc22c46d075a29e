"""The LSTM and GRU time loops on XLA CPU as C++ custom calls that run each step on every core.

XLA CPU runs a ``lax.scan`` body on one core: a step of a small recurrent layer is too little work
for its thread pool. ``csrc/recurrence.cc`` runs the loop in C++ instead, splitting the hidden units
over threads with small GEMMs per thread and step and one barrier per step, as oneDNN does (see
the file's header). This module loads it, registers it with XLA, and wraps it as
:func:`lstm_recurrence` and :func:`gru_recurrence`, the same functions as in :mod:`jlstm.fused`,
each with a hand-written backward: the C++ backward loop, which also sums the weight gradients
while they fit (:data:`WEIGHTS_IN_LOOP_BYTES`), else hands the gate gradients to whole-sequence
GEMMs (OpenBLAS's, run by the C++ team, :data:`BLAS_GEMMS`, or XLA's); and as
:func:`lstm_bidirectional` and :func:`gru_bidirectional`, both directions of a bidirectional
layer in one call, side by side, at inference.

The library is compiled when the package is built (``pip install``, ``pip wheel``: CMakeLists.txt),
once per ISA level of :data:`LEVELS`, and the best level the CPU runs is loaded
(``JLSTM_NATIVE_ISA=avx2|avx512|off`` overrides). ``JLSTM_NATIVE_BUILD=1`` compiles it instead at
first use, for this CPU, where no compiled library fits (:func:`build`). Where ``impl="auto"``
cannot take it, :class:`NativeFallbackWarning` says why, once. ``python -m jlstm.native`` says
what runs; :func:`available` whether it can. docs/native_build.md has the whole story.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jlstm import fused, loops
from jlstm.loops import input_grads, like, outputs, previous, weight_grad

SOURCES = Path(__file__).parent / "csrc"
SOURCE = SOURCES / "recurrence.cc"


@dataclasses.dataclass(frozen=True)
class Level:
    """One ISA level the library is compiled for: the CPU flags (``/proc/cpuinfo``) it needs and
    the compiler flags that select it. CMakeLists.txt compiles the same flags into
    ``_recurrence_<name>.so``."""

    cpu: frozenset
    flags: tuple[str, ...]


# x86-64-v3 (AVX2, FMA, BMI1/2, F16C, LZCNT, MOVBE) and x86-64-v4 (AVX-512 F, BW, CD, DQ, VL), the
# psABI levels; the source's register tiles follow __AVX512F__ (16 floats a vector, 8-row tiles)
# or AVX2 (8 floats, 6-row tiles). The best level first.
_V3 = frozenset({"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"})
LEVELS = {
    # -mprefer-vector-width=512: GCC may still vectorise at 256 bits for x86-64-v4; at 512 the
    # gate loops run on full vectors. With libmvec's tanhf the gates' tanh took 1.8 % of a wide
    # forward's profile samples at 512 bits against 3.6 % at 256 (Xeon, Sapphire Rapids class).
    "avx512": Level(
        _V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"},
        ("-march=x86-64-v4", "-mprefer-vector-width=512"),
    ),
    "avx2": Level(_V3, ("-march=x86-64-v3",)),
}
# What every level is compiled with. -fno-trapping-math lets GCC if-convert the selects of
# csrc/gate_math.h and vectorise the gate loops (it changes no value: only whether FP exception
# flags may be raised by operations whose results are discarded).
FLAGS = ("-O3", "-fno-math-errno", "-fopenmp-simd", "-fno-trapping-math", "-std=c++20")
FLAGS += ("-shared", "-fPIC", "-pthread")
# The opt-in build's flags for this CPU when JLSTM_NATIVE_ISA names no level: what the wheel's
# levels are measured against.
NATIVE_FLAGS = ("-march=native", "-mprefer-vector-width=512")
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


class NativeFallbackWarning(UserWarning):
    """``impl="auto"`` runs slower code on CPU than it would with jlstm's C++ library, because the
    library (or OpenBLAS, for a large layer's backward) is not available here; the message says
    why and what it costs. Issued once per process and cause; ``JLSTM_NATIVE_ISA=off`` (a choice,
    not a fault) issues none. Filter it as any warning:
    ``warnings.filterwarnings("ignore", category=jlstm.native.NativeFallbackWarning)``."""


def _cpu_flags() -> frozenset:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(
                word for line in f if line.startswith("flags") for word in line.split()[2:]
            )
    except OSError:
        return frozenset()


_FLAGS = _cpu_flags()


def _supported_platform() -> str | None:
    """None on Linux x86-64, the platform the C++ source is written for; else why not."""
    if platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64"):
        return None
    return f"the C++ loop is written for Linux x86-64, this is {platform.system()} {platform.machine()}"


def isa_choice() -> tuple[str | None, str]:
    """``(level, why)``: the ISA level of :data:`LEVELS` this process loads (None: none), and why.

    ``JLSTM_NATIVE_ISA`` names a level (``avx2``, ``avx512``) or ``off``; unset (or ``auto``), the
    best level whose CPU flags this CPU has.

    >>> level, why = isa_choice()
    >>> level is None or level in LEVELS
    True
    """
    asked = os.environ.get("JLSTM_NATIVE_ISA", "").strip().lower()
    if asked == "off":
        return None, "JLSTM_NATIVE_ISA=off turns the C++ loop off"
    if asked not in ("", "auto", *LEVELS):
        names = ", ".join((*LEVELS, "off"))
        return None, f"JLSTM_NATIVE_ISA must be one of {names} (or unset), got {asked!r}"
    if (reason := _supported_platform()) is not None:
        return None, reason
    if asked in LEVELS:
        missing = ", ".join(sorted(LEVELS[asked].cpu - _FLAGS))
        if missing:
            return None, f"JLSTM_NATIVE_ISA={asked}, but this CPU lacks {missing}"
        return asked, f"JLSTM_NATIVE_ISA={asked}"
    lacking = []
    for name, level in LEVELS.items():
        missing = ", ".join(sorted(level.cpu - _FLAGS))
        if not missing:
            return name, "the best level this CPU runs" + "".join(f"; {m}" for m in lacking)
        lacking.append(f"it lacks {missing} of {name}")
    return None, f"this CPU lacks {missing} (x86-64-v3)"


def _turned_off() -> bool:
    """Whether the user turned the C++ loop off (no warning is due then)."""
    return os.environ.get("JLSTM_NATIVE_ISA", "").strip().lower() == "off"


def _build_requested() -> bool:
    return os.environ.get("JLSTM_NATIVE_BUILD", "") not in ("", "0")


def _source_hash() -> str:
    """The digest of csrc/ that CMakeLists.txt compiles into each library (jlstm_source_hash)."""
    lines = "".join(
        f"{p.name} {hashlib.sha256(p.read_bytes()).hexdigest()}\n"
        for p in sorted((*SOURCES.glob("*.cc"), *SOURCES.glob("*.h")), key=lambda p: p.name)
    )
    return hashlib.sha256(lines.encode()).hexdigest()


def packaged_library(level: str) -> Path | None:
    """The library of ``level`` that ``pip install`` compiled into the package, or None. (An
    editable install keeps it in site-packages, the sources in the checkout: both are in the
    package's ``__path__``.)"""
    for folder in sys.modules[__package__].__path__:
        path = Path(folder) / f"_recurrence_{level}.so"
        if path.exists():
            return path
    return None


# --------------------------------------------------------------------------------------------
# The opt-in build at first use (JLSTM_NATIVE_BUILD=1)


def _cache_dir() -> Path:
    """``$JLSTM_CACHE``, else ``$XDG_CACHE_HOME/jlstm`` (``~/.cache/jlstm``); a folder of the
    temporary directory where that cannot be written (a read-only home)."""
    if "JLSTM_CACHE" in os.environ:
        return Path(os.environ["JLSTM_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    cache = Path(xdg) / "jlstm"
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=cache):
            return cache
    except OSError:
        return Path(tempfile.gettempdir()) / f"jlstm-{os.getuid()}"


def _compiler() -> str:
    return os.environ.get("CXX", "c++")


@functools.cache
def _compiler_identity(compiler: str) -> str:
    """``compiler --version``: part of the cache key, so that a new compiler builds anew."""
    try:
        done = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        raise NativeUnavailable(f"cannot run the C++ compiler {compiler!r}: {e}") from None
    if done.returncode != 0:
        said = done.stderr.strip()[-500:]
        said = f": {said}" if said else ""
        raise NativeUnavailable(f"`{compiler} --version` exited with {done.returncode}{said}")
    return done.stdout


def build_flags(level: str | None) -> tuple[str, ...]:
    """The compiler flags of the opt-in build: :data:`FLAGS`, ``level``'s (None: this CPU's,
    :data:`NATIVE_FLAGS`), then ``$JLSTM_CXXFLAGS``.

    >>> "-march=x86-64-v3" in build_flags("avx2")
    True
    """
    chosen = NATIVE_FLAGS if level is None else LEVELS[level].flags
    return (*FLAGS, *chosen, *os.environ.get("JLSTM_CXXFLAGS", "").split())


def _library_path(level: str | None, compiler: str) -> Path:
    key = hashlib.sha256()
    flags = build_flags(level)
    key.update(_source_hash().encode())
    key.update(" ".join(flags).encode())
    key.update(f"{jax.ffi.include_dir()} {jax.__version__}".encode())
    key.update(_compiler_identity(compiler).encode())
    if any("native" in f for f in flags):  # what -march=native depends on
        key.update(" ".join(sorted(_FLAGS)).encode())
    return _cache_dir() / f"recurrence-{key.hexdigest()[:16]}.so"


KEEP_BUILDS = 4  # the opt-in builds kept in the cache, the most recently used


def build(level: str | None = None, verbose: bool = False) -> Path:
    """Compiles ``csrc/recurrence.cc`` with the machine's C++ compiler (``$CXX``, else ``c++``)
    for ``level`` (None: this CPU, ``-march=native``) into the cache, once per sources, flags,
    JAX and compiler, and returns the library's path. Concurrent processes wait for one build
    (a file lock); the cache keeps the :data:`KEEP_BUILDS` most recently used. Raises
    :class:`NativeUnavailable` with the reason."""
    import fcntl

    compiler = _compiler()
    if shutil.which(compiler) is None:
        raise NativeUnavailable(f"no C++ compiler ({compiler!r}) on PATH to build the native LSTM")
    out = _library_path(level, compiler)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one process builds, the others wait and find it built
        if not out.exists():
            _compile(compiler, build_flags(level), out, verbose)
            _evict(out.parent)
        out.touch()  # used now: the eviction keeps the most recently used
    return out


def _compile(compiler: str, flags, out: Path, verbose: bool) -> None:
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        partial = Path(tmp) / out.name
        cmd = [compiler, *flags, "-isystem", jax.ffi.include_dir(), str(SOURCE)]
        cmd += ["-lmvec", "-o", str(partial)]
        if verbose:
            print(" ".join(cmd), file=sys.stderr)
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise NativeUnavailable(f"building {SOURCE.name} failed:\n{done.stderr[-4000:]}")
        os.replace(partial, out)  # atomic: a reader never sees a partial library


def _evict(cache: Path) -> None:
    """Removes all but the :data:`KEEP_BUILDS` most recently used builds (a process that loaded
    one keeps its mapping)."""
    builds = sorted(cache.glob("recurrence-*.so"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in builds[KEEP_BUILDS:]:
        for path in (old, old.with_suffix(".lock")):
            with contextlib.suppress(OSError):
                path.unlink()


# --------------------------------------------------------------------------------------------
# Loading


@dataclasses.dataclass(frozen=True)
class Loaded:
    """What this process runs: the level (None: the opt-in build's ``-march=native``), why that
    level, and the library's path."""

    level: str | None
    why: str
    path: Path
    built: bool  # compiled at first use (JLSTM_NATIVE_BUILD=1) rather than at install


def _find() -> Loaded:
    """The library this process loads; raises :class:`NativeUnavailable` with why there is none."""
    level, why = isa_choice()
    asked = os.environ.get("JLSTM_NATIVE_ISA", "").strip().lower()
    if _build_requested() and (level is not None or asked in ("", "auto")):
        if (reason := _supported_platform()) is not None:
            raise NativeUnavailable(reason)
        level = asked if asked in LEVELS else None
        what = "this CPU (-march=native)" if level is None else f"the {level} level"
        return Loaded(level, f"JLSTM_NATIVE_BUILD=1 compiles for {what}", build(level), True)
    if level is None:
        raise NativeUnavailable(why)
    path = packaged_library(level)
    if path is None:
        raise NativeUnavailable(
            f"jlstm was installed without its compiled library (_recurrence_{level}.so is not in "
            f"{', '.join(sys.modules[__package__].__path__)}): reinstall it with `pip install` "
            "from a wheel or the source (which compiles it), or set JLSTM_NATIVE_BUILD=1 to "
            "compile it at first use"
        )
    return Loaded(level, why, path, built=False)


@functools.cache
def loaded() -> Loaded:
    """The library this process has loaded and registered with XLA (loads it on the first call).
    Raises :class:`NativeUnavailable` with why it cannot."""
    found = _find()
    try:
        library = ctypes.CDLL(str(found.path))
    except OSError as e:
        raise NativeUnavailable(f"cannot load {found.path}: {e}") from None
    if not found.built and (reason := _stale_reason(found.path, library)) is not None:
        raise NativeUnavailable(reason)
    for name in TARGETS:
        symbol = "Jlstm" + name.title().replace("_", "")
        target = jax.ffi.pycapsule(getattr(library, symbol))
        jax.ffi.register_ffi_target(f"jlstm_{name}", target, platform="cpu")
    _libraries.append(library)
    return found


def _stale_reason(path: Path, library: ctypes.CDLL) -> str | None:
    """Why the compiled ``library`` at ``path`` must not run (compiled from other sources than the
    package holds), or None."""
    built_from = (ctypes.c_char * 65).in_dll(library, "jlstm_source_hash").value.decode()
    if built_from == _source_hash():
        return None
    return (
        f"{path} was compiled from other sources than {SOURCES} holds (edited since the "
        "install?): `pip install -e .` (make install) compiles them again, or "
        "JLSTM_NATIVE_BUILD=1 compiles them at first use"
    )


_libraries: list[ctypes.CDLL] = []  # the library loaded (ctypes closes none, this keeps it named)


def _load() -> ctypes.CDLL:
    loaded()
    return _libraries[0]


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
    if (reason := unavailable_reason()) is not None:
        return f"the C++ loop is not available: {reason}"
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


def unavailable_reason() -> str | None:
    """None if the native loops are loaded and registered, else why not (loads on the first call;
    the opt-in build compiles then). ``JLSTM_NATIVE_ISA=off`` takes effect at any time; the level,
    once loaded, stays for the process."""
    if _turned_off():
        return isa_choice()[1]
    return _load_reason()


@functools.cache
def _load_reason() -> str | None:
    try:
        loaded()
    except (NativeUnavailable, OSError) as e:
        return str(e)
    return None


def available() -> bool:
    """Whether the native loops can run here (loads the library on the first call)."""
    return unavailable_reason() is None


# The cost of each fallback, for the warning: the pure-JAX loop's time against the C++ loop's
# (make bench, the jlstm-fused column against jlstm), and the wide case's train step with XLA's
# GEMMs against OpenBLAS's (2-core AMD EPYC, Zen 3).
_COSTS = {
    "loop": "impl='auto' runs the pure-JAX loop (impl='fused') on CPU instead, which takes 1.3-2x "
    "the C++ loop's time",
    "blas": "a large layer's backward forms its weight gradients with XLA's GEMMs instead, whose "
    "train step took up to 1.14x the time with OpenBLAS's",
}


_warned: set[str] = set()  # the causes warned about in this process


def warn_fallback(cause: str, reason: str) -> None:
    """Issues :class:`NativeFallbackWarning` once per process and ``cause`` (``"loop"`` or
    ``"blas"``), saying ``reason``, unless the C++ loop was turned off (``JLSTM_NATIVE_ISA=off``)."""
    if _turned_off() or cause in _warned:
        return
    _warned.add(cause)
    warnings.warn(
        f"jlstm: {_COSTS[cause]}: {reason}. (`python -m jlstm.native` says what runs; "
        "docs/native_build.md)",
        NativeFallbackWarning,
        stacklevel=2,
    )


def export_checks() -> list:
    """What ``jax.export`` must be told to export a CPU program that calls the C++ loops, which
    only ``impl="native"`` does (``impl="auto"`` exports the portable loop):
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


def _unless_exported(portable_export: bool, fast, portable, *args):
    """``fast(*args)``; with ``portable_export``, lowered as ``portable(*args)`` for ``jax.export``
    (:func:`jlstm.loops.unless_exported`): what ``impl="auto"`` asks for, so that an exported
    program holds no custom call of this library."""
    if not portable_export:
        return fast(*args)
    return loops.unless_exported(fast, portable, *args)


def _placeholders(x, *shapes):
    """Zeros of ``shapes`` in ``x``'s dtype (varying as ``x``): what a portable forward returns in
    place of the C++ forward's saved arrays, which the portable backward does not read (XLA drops
    them)."""
    return tuple(loops.vary_like(jnp.zeros(shape, x.dtype), x) for shape in shapes)


def _portable_backward(recurrence, arity, reverse, residuals, cotangents, needed):
    """The gradients of ``arity`` arrays by the pure-JAX loop ``recurrence`` (a
    :mod:`jlstm.fused` loop on CPU), its forward run again: the backward of an exported program
    (:func:`_unless_exported`). None where not ``needed``, and for ``valid``."""
    arrays, valid = residuals[:arity], residuals[arity]
    loop = lambda *a: recurrence(*a, valid, reverse, 1, False)  # noqa: E731
    grads = jax.vjp(loop, *arrays)[1](tuple(cotangents))
    return _needed(grads, needed)


def _needed(grads, needed) -> tuple:
    """``grads`` with None where not ``needed`` (and for ``valid``, after them)."""
    return (*(g if want else None for g, want in zip(grads, needed, strict=False)), None)


def _forward(w_ih, w_hh, bias, x, h0, c0, valid, reverse, portable_export, *, save):
    """The loop (each step's input projection inside it). With ``save``, also what the backward
    needs."""

    def portable(w_ih, w_hh, bias, x, h0, c0, valid):
        out = fused.lstm_recurrence(w_ih, w_hh, bias, x, h0, c0, valid, reverse, 1, False)
        seq, gates = x.shape[:2] + h0.shape[-1:], x.shape[:2] + (4 * h0.shape[-1],)
        return tuple(out), _placeholders(x, seq, *((seq, gates) if save else ()))

    fast = functools.partial(_lstm_forward, reverse=reverse, save=save)
    return _unless_exported(portable_export, fast, portable, w_ih, w_hh, bias, x, h0, c0, valid)


def _lstm_forward(w_ih, w_hh, bias, x, h0, c0, valid, reverse, save):
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
# weight gradients as large GEMMs on every core. On a 2-core AMD EPYC (Zen 4), with this limit set to
# 0 against the default, handing the gates to XLA made a train step 1.64x slower on mnist (47 KB of
# rows per thread) and 1.41x on long (196 KB), and changed nothing on medium (up to 1.5 MB) or wide
# (12.6 MB, past the limit). Rows that outgrow the caches are streamed from memory every step,
# while XLA's GEMMs keep scaling with cores, hence a limit. Any batch: the loop adds a small
# batch's gate gradients in groups of steps (accumulation_group in the C++ source), so a batch of
# 1 or 2 does not read and write the rows for one or two multiply-adds per step.
WEIGHTS_IN_LOOP_BYTES = 2 * 1024 * 1024

# Gates out, the LSTM backward writes its gate gradients over the saved gates (an input-output
# alias: a step's in place, each thread over the gates it has just read): the train step allocates
# one (L, N, 4H) buffer fewer. On wide (128 x 64 x 512 -> 1024) XLA's temporaries fall from 352 to
# 224 MiB and the step took 0.78-0.95 of its time in 4 alternating rounds. False: a buffer of their
# own.
OVERWRITE_SAVED_GATES = True


# The weight gradients past WEIGHTS_IN_LOOP_BYTES are XLA GEMMs over the whole sequence, sum_t d_t^T
# v_t. Where the CPU has no AVX-512, XLA CPU (jaxlib 0.10.2) runs them faster with v's transpose
# written out first (loops.weight_grad's transpose_first) than folded into the dot on large gate
# counts. On a 2-core AMD EPYC (Zen 3, AVX2 only), the time of the copy form over the folded one at
# (L*N, K, G): (8192, 1024,
# 4096) 0.57, (8192, 512, 4096) 0.54, (16384, 2048, 8192) 0.54, (1024, 1024, 4096) 0.58, (4096,
# 512, 1024) 0.94, (4096, 256, 1024) 0.99, (2048, 128, 512) 0.84, but (65536, 64, 512) 1.43. With
# AVX-512 (a Xeon, Sapphire Rapids class) the folded form stays: there the other folded form,
# d^T v, gained nothing, and the copy has not been measured. Read once, from the CPU's flags (x86
# with AVX2 but not AVX-512): XLA's GEMMs follow the CPU, whichever level the C++ loop runs.
TRANSPOSE_FIRST = "avx2" in _FLAGS and "avx512f" not in _FLAGS


# A backward that hands its gate gradients out (past WEIGHTS_IN_LOOP_BYTES) forms dW_ih, dW_hh and
# dx with OpenBLAS's GEMMs, called by the C++ team on shares of the output (csrc/recurrence.cc,
# sequence_grads), rather than with XLA's dots, where OpenBLAS loads (blas_unavailable_reason). It
# also reads h_{t-1} and the transposes in place instead of copying them. On a 2-core AMD EPYC
# (Zen 3, AVX2): the wide case's three GEMMs at 142-174 GFLOP/s against 122-149 XLA's way
# (0.80-0.86 of the time), the train step in 0.88-0.96 of the time and 192.5 MiB of XLA
# temporaries against 224.5. On a 2-core Xeon (Sapphire Rapids class), NumPy's OpenBLAS ran the
# same shapes at 298-380 GFLOP/s against XLA's 293-344 (not measured through this path). False:
# XLA's dots.
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
    held (1.97), its saving forward and backward apart 990 + 1861 ms."""
    return jax.lax.optimization_barrier(arrays)


def _dx_shape(x, needed: bool) -> tuple:
    """The shape of the in-loop backward's dx result: x's, or (0,) when nothing needs dx (the C++
    loop then skips its GEMM, dgates_t @ W_ih, every step)."""
    return x.shape if needed else (0,)


def _blas_gemms(x, w_hh) -> bool:
    """Whether a gates-out backward's whole-sequence GEMMs go to OpenBLAS (:data:`BLAS_GEMMS`):
    where it loads and the sizes fit its 32-bit integers."""
    rows, largest = x.shape[0] * x.shape[1], max(x.shape[-1], *w_hh.shape)
    if not BLAS_GEMMS or rows * largest >= 2**31:
        return False
    if (reason := blas_unavailable_reason()) is not None:
        warn_fallback("blas", reason)
        return False
    return True


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


def _backward(native_bwd, recurrence):
    """A C++ loop's backward: ``native_bwd`` in a jitted call, the pure-JAX ``recurrence``'s in an
    exported program (:func:`_unless_exported`)."""

    def bwd(reverse, portable_export, residuals, cotangents, needed):
        fast = lambda r, c: _needed(native_bwd(reverse, r, c, needed), needed)  # noqa: E731
        portable = functools.partial(_portable_backward, recurrence, 6, reverse, needed=needed)
        return _unless_exported(portable_export, fast, portable, residuals, cotangents)

    return bwd


def _lstm_bwd(reverse, residuals, cotangents, needed):
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


_lstm_loop = loops.loop_with_backward(
    _forward,
    _backward(_lstm_bwd, fused.lstm_recurrence),
    loops.lstm_reference,
    "One LSTM direction (C++).",
)


def lstm_recurrence(w_ih, w_hh, bias, x, h0, c0, valid, reverse=False, portable_export=False):
    """``(ys, h_n, c_n)`` of one LSTM direction without projection, as
    :func:`jlstm.fused.lstm_recurrence` (same arguments, no ``unroll``/``hoist``).
    ``portable_export``: a ``jax.export`` lowers the fused loop instead of the C++ calls (what
    ``impl="auto"`` asks for)."""
    return _lstm_loop(w_ih, w_hh, bias, x, h0, c0, valid, reverse, portable_export)


# --------------------------------------------------------------------------------------------
# GRU


def _gru_forward(w_ih, w_hh, bias, b_hn, x, h0, valid, reverse, portable_export, *, save):
    """The loop; with ``save`` also every step's [r | z | n | W_hn h + b_hn] for the backward."""

    def portable(w_ih, w_hh, bias, b_hn, x, h0, valid):
        out = fused.gru_recurrence(w_ih, w_hh, bias, b_hn, x, h0, valid, reverse, 1, False)
        seq, acts = x.shape[:2] + h0.shape[-1:], x.shape[:2] + (4 * h0.shape[-1],)
        return tuple(out), _placeholders(x, seq, acts if save else (0,))

    fast = functools.partial(_gru_native_forward, reverse=reverse, save=save)
    return _unless_exported(portable_export, fast, portable, w_ih, w_hh, bias, b_hn, x, h0, valid)


def _gru_native_forward(w_ih, w_hh, bias, b_hn, x, h0, valid, reverse, save):
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


def _gru_native_bwd(reverse, residuals, cotangents, needed):
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


_gru_loop = loops.loop_with_backward(
    _gru_forward,
    _backward(_gru_native_bwd, fused.gru_recurrence),
    loops.gru_reference,
    "One GRU direction (C++).",
)


def gru_recurrence(w_ih, w_hh, bias, b_hn, x, h0, valid, reverse=False, portable_export=False):
    """``(ys, h_n)`` of one GRU direction, as :func:`jlstm.fused.gru_recurrence` (same
    arguments, no ``unroll``/``hoist``); ``portable_export`` as in :func:`lstm_recurrence`."""
    return _gru_loop(w_ih, w_hh, bias, b_hn, x, h0, valid, reverse, portable_export)


# --------------------------------------------------------------------------------------------
# Both directions of a bidirectional layer in one call: at inference the C++ team splits in two
# and runs them side by side (csrc/recurrence.cc, run_forward). Any derivative takes each direction's
# own loop (lstm_recurrence, gru_recurrence), so gradients, JVPs and their memory are those of two
# separate directions.


def _bidirectional(kind, recurrence, portable_recurrence, states):
    def pair(forward, backward, x, valid):
        _load()
        length, batch, hidden = x.shape[0], x.shape[1], forward[-1].shape[-1]
        outs = (like((length, batch, hidden), x),) + (like((batch, hidden), x),) * (states - 1)
        results = jax.ffi.ffi_call(
            f"jlstm_{kind}_inference_pair", outs * 2, vmap_method="sequential"
        )(x, *forward, *backward, _valid_bytes(valid), masked=np.int64(valid is not None))
        f, b = results[: len(outs)], results[len(outs) :]
        return (*outputs(f[0], valid, False), *f[1:]), (*outputs(b[0], valid, True), *b[1:])

    def portable(forward, backward, x, valid):
        def one(arrays, reverse):
            weights, carry = arrays[:-states], arrays[-states:]
            return tuple(portable_recurrence(*weights, x, *carry, valid, reverse, 1, False))

        return one(forward, False), one(backward, True)

    @functools.partial(jax.custom_jvp, nondiff_argnums=(4,))
    def both(forward, backward, x, valid, portable_export=False):
        return _unless_exported(portable_export, pair, portable, forward, backward, x, valid)

    @both.defjvp
    def _jvp(portable_export, primals, tangents):
        forward, backward, x, valid = primals
        d_forward, d_backward, dx, _ = tangents

        def one(arrays, x, reverse):
            weights, carry = arrays[:-states], arrays[-states:]
            return recurrence(*weights, x, *carry, valid, reverse, portable_export)

        out_f, t_f = jax.jvp(lambda a, x: one(a, x, False), (forward, x), (d_forward, dx))
        out_b, t_b = jax.jvp(lambda a, x: one(a, x, True), (backward, x), (d_backward, dx))
        return (out_f, out_b), (t_f, t_b)

    both.__doc__ = f"""``(forward direction's, reverse direction's)`` results of one bidirectional
    {kind.upper()} layer, each as :func:`{kind}_recurrence` gives them with ``reverse`` False and
    True. ``forward`` and ``backward`` hold each direction's arguments but ``x`` and ``valid`` in
    :func:`{kind}_recurrence`'s order (weights, then the initial state); ``x (L, N, I)`` and
    ``valid (L, N, 1)`` bool or None are shared; ``portable_export`` as in
    :func:`{kind}_recurrence`."""
    return both


lstm_bidirectional = _bidirectional("lstm", lstm_recurrence, fused.lstm_recurrence, states=2)
gru_bidirectional = _bidirectional("gru", gru_recurrence, fused.gru_recurrence, states=1)


def _blas_line() -> str:
    reason = blas_unavailable_reason()
    if reason is not None:
        return f"XLA's GEMMs for a large layer's backward ({reason})"
    import scipy_openblas32

    version = getattr(scipy_openblas32, "__version__", "")
    return f"OpenBLAS (scipy-openblas32 {version}) for a large layer's backward".replace(" )", ")")


def main() -> None:
    """``python -m jlstm.native``: whether ``impl="auto"`` runs the C++ loop on CPU, and with
    what: the ISA level and why, the library, the threads, the BLAS. Exits with 1 where it does
    not run."""
    reason = unavailable_reason()
    if reason is not None:
        print(f"jlstm.native: the C++ loop is off: {reason}")
        print("  impl='auto' runs the pure-JAX loop (impl='fused') on CPU")
        sys.exit(1)
    found = loaded()
    level = found.level or "native"
    how = "compiled at first use" if found.built else "compiled at install"
    print("jlstm.native: the C++ loop is on (impl='auto' takes it on CPU)")
    overrides = "|".join((*LEVELS, "off"))
    print(f"  ISA level: {level} ({found.why}; JLSTM_NATIVE_ISA={overrides} overrides)")
    print(f"  library:   {found.path} ({how})")
    print(f"  threads:   {_threads()} (JLSTM_NATIVE_THREADS caps them)")
    print(f"  BLAS:      {_blas_line()}")


if __name__ == "__main__":
    # Run as `python -m jlstm.native`, this file is a second module beside the jlstm.native that
    # importing jlstm loaded: report on that one, the one the layers use.
    from jlstm import native

    native.main()
