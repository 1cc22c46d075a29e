"""The C++ LSTM and GRU loops (jlstm.native): the path impl="auto" takes on CPU gives the lax.scan
path's outputs, states and gradients on a grid that crosses the kernel's edges (1 unit, thread blocks of
16 units, register tiles of 8 rows), with any number of threads, under vmap and concurrent calls;
and it is refused, or skipped by auto, where it cannot run. Torch parity of both paths is in
test_torch_parity.py."""

import concurrent.futures
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from paths import (
    LAYERS,
    _problem,
    _value_and_grads,
    assert_forward_matches_the_scan_path,
    assert_matches_the_scan_path,
)
from trees import assert_trees_close, probe_loss

import jlstm
from jlstm import native

ROOT = Path(__file__).parent.parent


KINDS = pytest.mark.parametrize("kind", list(LAYERS))


@KINDS
def test_auto_takes_the_native_loop_on_cpu(kind):
    params, x, state = _problem(kind, 3, 2, 4, 5, jnp.float32)
    assert native.available(), native.unavailable_reason()

    def hlo(impl, grad):
        fn = lambda p, x: jnp.sum(LAYERS[kind][0](p, x, state, impl=impl)[0])  # noqa: E731
        return jax.jit(jax.grad(fn) if grad else fn).lower(params, x).as_text()

    inference = f"jlstm_{kind}_inference" if kind == "lstm" else f"jlstm_{kind}_forward"
    assert inference in hlo("auto", grad=False)
    train = hlo("auto", grad=True)
    assert f"jlstm_{kind}_forward" in train and f"jlstm_{kind}_backward" in train
    assert "jlstm_" not in hlo("fused", grad=True)


@KINDS
def test_auto_skips_the_native_loop_when_turned_off(kind, monkeypatch):
    params, x, state = _problem(kind, 3, 2, 4, 5, jnp.float32)
    monkeypatch.setenv("JLSTM_NATIVE", "0")
    fn = lambda p, x: jnp.sum(LAYERS[kind][0](p, x, state)[0])  # noqa: E731
    assert "jlstm_" not in jax.jit(fn).lower(params, x).as_text()
    with pytest.raises(ValueError, match=r"not available here: JLSTM_NATIVE=0 turns it off"):
        LAYERS[kind][0](params, x, state, impl="native")


# Sizes: 1 everywhere; hidden 15/16/17 around one thread's block of 16 units, 33 and 100 split over
# threads with a ragged last block; batch 9 = a tile of 8 rows + 1; long enough to hit every tile.
# The in-loop backward adds steps in groups of 64 // batch (at most 16): L=6, N=17 is two whole
# groups of 3, L=7, N=12 a part group of 2 then a whole one of 5, the others one part group.
SIZES = [(1, 1, 1, 1), (4, 9, 3, 15), (3, 2, 5, 16), (5, 3, 1, 17), (6, 17, 7, 33), (2, 8, 4, 100)]
SIZES += [(7, 12, 3, 20)]


def GRID(test):  # noqa: N802 (a decorator)
    """Every size of SIZES in float64 and float32, with their tolerances."""
    dtypes = [(jnp.float64, 1e-12), (jnp.float32, 2e-5)]
    test = pytest.mark.parametrize("dtype,tol", dtypes, ids=["f64", "f32"])(test)
    ids = lambda s: "L{}-N{}-I{}-H{}".format(*s)  # noqa: E731
    return pytest.mark.parametrize("size", SIZES, ids=ids)(test)


@pytest.fixture(params=["weights-in-loop", "gates-out-blas", "gates-out", "gates-out-transposed"])
def backward(request, monkeypatch):
    """Both ways the backward kernel can end: weight gradients summed in the loop, or every step's
    gate gradients handed out (jlstm.native.weights_in_loop chooses by size and batch) to OpenBLAS
    (jlstm.native.BLAS_GEMMS, the default) or to XLA's dots, whose weight-gradient GEMMs take
    either form (jlstm.native.TRANSPOSE_FIRST chooses by CPU)."""
    in_loop = request.param == "weights-in-loop"
    monkeypatch.setattr(
        native, "WEIGHTS_IN_LOOP_BYTES", native.WEIGHTS_IN_LOOP_BYTES if in_loop else 0
    )
    monkeypatch.setattr(native, "BLAS_GEMMS", request.param == "gates-out-blas")
    monkeypatch.setattr(native, "TRANSPOSE_FIRST", request.param == "gates-out-transposed")
    jax.clear_caches()  # the layer stack is jitted: retrace with the setting
    yield request.param
    jax.clear_caches()


@KINDS
def test_each_backward_is_taken(kind, backward):
    params, x, state = _problem(kind, 3, 2, 4, 5, jnp.float32)
    loss = lambda p: jnp.sum(LAYERS[kind][0](p, x, state)[0])  # noqa: E731
    text = jax.jit(jax.grad(loss)).lower(params).as_text()
    assert (f"jlstm_{kind}_backward_gates" in text) == (backward != "weights-in-loop")
    assert ("jlstm_sequence_grads" in text) == (backward == "gates-out-blas")
    assert f"jlstm_{kind}_backward" in text


@KINDS
@pytest.mark.parametrize("batch", [1, 2, 3, 8])
@pytest.mark.parametrize("hidden", [5, 256, 1024])
def test_default_backward_by_batch(kind, batch, hidden, monkeypatch):
    """With the defaults and two threads, every batch size sums the weight gradients in the loop
    while a thread's rows fit WEIGHTS_IN_LOOP_BYTES (hidden 5 and 256; a small batch adds its steps
    in groups) and hands its gate gradients to XLA beyond (hidden 1024: 8 MiB of rows)."""
    monkeypatch.setenv("JLSTM_NATIVE_THREADS", "2")
    jax.clear_caches()
    params, x, state = _problem(kind, 3, batch, 4, hidden, jnp.float32)
    loss = lambda p: jnp.sum(LAYERS[kind][0](p, x, state)[0])  # noqa: E731
    text = jax.jit(jax.grad(loss)).lower(params).as_text()
    assert (f"jlstm_{kind}_backward_gates" in text) == (hidden == 1024)
    assert ("jlstm_sequence_grads" in text) == (hidden == 1024)  # OpenBLAS's GEMMs by default
    assert f"jlstm_{kind}_backward" in text
    jax.clear_caches()


@GRID
@KINDS
def test_native_matches_the_scan_path(kind, size, dtype, tol, backward):
    assert_matches_the_scan_path("native", kind, size, dtype, tol)


@GRID
@KINDS
def test_native_weight_gradients_alone_match_the_scan_path(kind, size, dtype, tol):
    """The weights' gradients without the input's, whose GEMM the in-loop backward then leaves out
    (the default backward at these sizes, test_default_backward_by_batch)."""
    assert_matches_the_scan_path("native", kind, size, dtype, tol, argnums=0)


@GRID
@KINDS
def test_native_inference_matches_the_scan_path(kind, size, dtype, tol):
    assert_forward_matches_the_scan_path("native", kind, size, dtype, tol)


@KINDS
def test_inference_equals_the_training_forward(kind):
    """The call without gradients (the kernel that saves nothing) gives bit for bit what the
    training forward (the kernel that saves the gates) gives."""
    params, x, state = _problem(kind, 7, 5, 3, 40, jnp.float64, bidirectional=True)
    lengths = jnp.array([7, 0, 3, 6, 1])

    def run(p):
        return LAYERS[kind][0](p, x, state, seq_lengths=lengths, impl="native")

    assert_trees_close(jax.jit(run)(params), jax.vjp(run, params)[0], rtol=0, atol=0)


@KINDS
def test_a_bidirectional_layer_runs_its_directions_in_one_call(kind):
    """At inference both directions of a bidirectional layer are one C++ call (a team per
    direction, side by side); under a derivative, for a unidirectional layer or with
    checkpoint_every segments, each direction is its own call."""
    layer = LAYERS[kind][0]
    params, x, state = _problem(kind, 6, 3, 4, 20, jnp.float32, layers=2, bidirectional=True)
    one = f"@jlstm_{kind}_inference(" if kind == "lstm" else f"@jlstm_{kind}_forward("

    def text(params, state, **kw):
        return jax.jit(lambda p: layer(p, x, state, **kw)[0]).lower(params).as_text()

    forward = text(params, state)
    assert forward.count(f"@jlstm_{kind}_inference_pair(") == 2 and one not in forward
    segmented = text(params, state, checkpoint_every=4)
    assert "pair" not in segmented and segmented.count(one) == 4
    grad = jax.jit(jax.grad(lambda p: jnp.sum(layer(p, x, state)[0]))).lower(params)
    assert "pair" not in grad.as_text()
    uni_params, _, uni_state = _problem(kind, 6, 3, 4, 20, jnp.float32, layers=2)
    unidirectional = text(uni_params, uni_state)
    assert "pair" not in unidirectional and unidirectional.count(one) == 2


@KINDS
@pytest.mark.parametrize("backward", ["weights-in-loop"], indirect=True)
def test_an_input_nothing_differentiates_gets_no_gradient(kind, backward):
    """The gradient of the weights alone (the data a first layer reads is not differentiated, as in
    a training program) leaves out the in-loop backward's dx GEMM: the first layer's backward calls
    get an empty dx, the second layer's a full one (its input is the first layer's output), and
    the weights' gradients are the same bits as when dx is formed too."""
    layer = LAYERS[kind][0]
    params, x, state = _problem(kind, 6, 3, 4, 20, jnp.float32, layers=2, bidirectional=True)
    loss = lambda p, x: probe_loss(*layer(p, x, state))  # noqa: E731
    weights, both = (jax.jit(jax.grad(loss, argnums=a)) for a in (0, (0, 1)))

    def backward_calls(fn):
        text = fn.lower(params, x).as_text()
        return [line for line in text.splitlines() if f"@jlstm_{kind}_backward(" in line]

    empty = "-> (tensor<0xf32>"  # the first result, dx
    assert [empty in c for c in backward_calls(weights)] == [False, False, True, True]
    assert not any(empty in c for c in backward_calls(both))
    assert_trees_close(weights(params, x), both(params, x)[0], rtol=0, atol=0)


@KINDS
def test_vmap_over_independent_problems(kind):
    params, x, state = _problem(kind, 4, 3, 2, 20, jnp.float64)
    layer = LAYERS[kind][0]
    xs = jnp.stack([x, 2 * x, -x])
    got = jax.vmap(lambda x: layer(params, x, state, impl="native"))(xs)
    want = [layer(params, x, state, impl="fused") for x in xs]
    assert_trees_close(got, jax.tree.map(lambda *a: jnp.stack(a), *want), rtol=1e-12, atol=1e-12)


@KINDS
def test_gates_out_holds_xla_work_until_the_loop_ends(kind, monkeypatch):
    """Gates out, the whole-sequence work after the backward loop (x's and h's transposes, the
    weight GEMMs) reads x through an optimization barrier with the loop's gate gradients, so XLA
    cannot start it beside the loop and take a thread the loop's team waits for. (With OpenBLAS's
    GEMMs, the default, that work is the C++ team's, after the loop.)"""
    monkeypatch.setattr(native, "WEIGHTS_IN_LOOP_BYTES", 0)
    monkeypatch.setattr(native, "BLAS_GEMMS", False)
    jax.clear_caches()
    params, x, state = _problem(kind, 3, 2, 4, 5, jnp.float32)
    loss = lambda p: jnp.sum(LAYERS[kind][0](p, x, state)[0])  # noqa: E731
    lines = [ln.strip() for ln in jax.jit(jax.grad(loss)).lower(params).as_text().splitlines()]
    calls = [ln for ln in lines if f"@jlstm_{kind}_backward_gates(" in ln]
    assert len(calls) == 1
    result, x_arg = calls[0].split(":")[0], calls[0].split("(")[1].split(",")[0]

    def operands(line):  # "%a, %b" of "%r:2 = stablehlo.op %a, %b : types" or "op(%a, %b) {...}"
        rhs = line.split("=", 1)[-1].split(" : ")[0]
        return [w.strip("(),") for w in rhs.replace("(", " ").split()]

    held = [ln for ln in lines if "optimization_barrier" in ln and f"{result}#0" in operands(ln)]
    assert len(held) == 1 and x_arg in operands(held[0])
    x_uses = [ln for ln in lines if x_arg in operands(ln)]
    assert x_uses[-1] == held[0], "x is read after the loop other than through the barrier"
    jax.clear_caches()


def test_gates_out_blas_gives_the_same_bits_every_call(monkeypatch):
    """Gates out, OpenBLAS's GEMMs are split into shares of rows that do not depend on how many of
    the team's helpers joined a call: thirty calls, one result. (Split by the team that formed, a
    helper that came late changed dx's last bits, and with it every gradient below.)"""
    monkeypatch.setattr(native, "WEIGHTS_IN_LOOP_BYTES", 0)
    jax.clear_caches()
    params, x, state = _problem("lstm", 5, 3, 4, 20, jnp.float64, layers=2, bidirectional=True)
    loss = lambda p, x: jnp.sum(jnp.sin(jlstm.lstm(p, x, state)[0]))  # noqa: E731
    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    assert "jlstm_sequence_grads" in grad.lower(params, x).as_text()
    first = grad(params, x)
    for _ in range(30):
        assert_trees_close(grad(params, x), first, rtol=0, atol=0)
    jax.clear_caches()


def test_gates_out_takes_xla_dots_without_openblas(monkeypatch):
    """Where OpenBLAS does not load, a gates-out backward's GEMMs are XLA's, with the same
    gradients."""
    monkeypatch.setattr(native, "WEIGHTS_IN_LOOP_BYTES", 0)
    params, x, state = _problem("gru", 4, 3, 5, 6, jnp.float64, layers=2, bidirectional=True)
    loss = lambda p, x: jnp.sum(jnp.sin(jlstm.gru(p, x, state)[0]))  # noqa: E731
    grads = {}
    for reason in (None, "scipy-openblas32 is not installed (test)"):
        monkeypatch.setattr(native, "blas_unavailable_reason", lambda reason=reason: reason)
        jax.clear_caches()
        grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
        assert ("jlstm_sequence_grads" in grad.lower(params, x).as_text()) == (reason is None)
        grads[reason] = grad(params, x)
    assert_trees_close(*grads.values(), rtol=1e-12, atol=1e-12)
    jax.clear_caches()


def test_gates_out_overwrites_the_saved_gates(monkeypatch):
    """Gates out, the LSTM backward writes its gate gradients over the saved gates (one (L, N, 4H)
    buffer fewer per train step): the call declares the alias, gradients under jit and vmap (where
    XLA must copy what a later use still needs) are the scan path's, and a jax.export round trip
    keeps the alias and the numbers."""
    monkeypatch.setattr(native, "WEIGHTS_IN_LOOP_BYTES", 0)
    jax.clear_caches()
    params, x, state = _problem("lstm", 5, 3, 4, 20, jnp.float64, layers=2, bidirectional=True)

    def loss(p, x, impl):
        ys, (h_n, c_n) = jlstm.lstm(p, x, state, impl=impl)
        return jnp.sum(ys * jnp.cos(ys)) + jnp.sum(h_n * c_n)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
    text = grad.lower(params, x, "native").as_text()
    calls = [line for line in text.splitlines() if "@jlstm_lstm_backward_gates" in line]
    assert len(calls) == 4 and all("output_operand_aliases" in c for c in calls)
    xs = jnp.stack([x, -2 * x, x[::-1]])
    got = jax.vmap(lambda x: grad(params, x, "native"))(xs)
    want = [grad(params, x, "scan") for x in xs]
    assert_trees_close(got, jax.tree.map(lambda *a: jnp.stack(a), *want), rtol=1e-10, atol=1e-10)
    step = jax.jit(lambda p, x: grad(p, x, "native"))
    exported = jax.export.export(step, platforms=["cpu"], disabled_checks=native.export_checks())
    exported = exported(params, x)
    assert "output_operand_aliases" in exported.mlir_module()
    restored = jax.export.deserialize(exported.serialize())
    assert_trees_close(restored.call(params, x), step(params, x), rtol=0, atol=0)
    jax.clear_caches()


def test_concurrent_calls_agree_with_one_call():
    """Calls from several Python threads at once share the kernel's thread pool (a call that finds
    it busy runs alone); every result is the one a single call gives."""
    params, x, state = _problem("lstm", 50, 4, 8, 64, jnp.float32)
    run = jax.jit(lambda x: _value_and_grads("lstm", params, x, state, "native"))
    inputs = [x * (1 + i / 10) for i in range(6)]
    want = [jax.device_get(run(x)) for x in inputs]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        got = list(pool.map(lambda x: jax.device_get(run(x)), inputs))
    for g, w in zip(got, want, strict=True):
        assert_trees_close(g, w, rtol=0, atol=0)


_THREADS_SCRIPT = """
import sys, jax, jax.numpy as jnp, numpy as np, jlstm
jax.config.update("jax_enable_x64", True)
x = jax.random.normal(jax.random.key(1), (9, 11, 6), jnp.float64)
results = []
for layer, init in ((jlstm.lstm, jlstm.init_lstm), (jlstm.gru, jlstm.init_gru)):
    p = init(jax.random.key(0), 6, 70, bidirectional=True, dtype=jnp.float64)
    loss = lambda p, x: jnp.sum(jnp.sin(layer(p, x, seq_lengths=jnp.arange(11) % 10)[0]))
    results += jax.tree.leaves(jax.value_and_grad(loss, argnums=(0, 1))(p, x))
    results += jax.tree.leaves(jax.jit(layer)(p, x, seq_lengths=jnp.arange(11) % 10))
np.savez(sys.argv[1], *results)
"""


# Batch 7 = a 6-row tile + 1 and 13 = 2 tiles + 1 (AVX2's tiles have 6 rows); hidden 33 and 100
# leave last panels of 1 and 2 vectors. Each with weights in the loop and gates out.
AVX2_SIZES = [(5, 7, 3, 33), (4, 13, 5, 100), (3, 1, 2, 17)]

_AVX2_SCRIPT = """
import ast, sys, jax, jax.numpy as jnp
sys.path.insert(0, sys.argv[1])
from paths import assert_forward_matches_the_scan_path, assert_matches_the_scan_path
from jlstm import native
jax.config.update("jax_enable_x64", True)
assert "-mno-avx512f" in native.FLAGS and native.available(), native.unavailable_reason()
for in_loop in (native.WEIGHTS_IN_LOOP_BYTES, 0):
    native.WEIGHTS_IN_LOOP_BYTES = in_loop
    for size in ast.literal_eval(sys.argv[2]):
        for kind in ("lstm", "gru"):
            for dtype, tol in ((jnp.float64, 1e-12), (jnp.float32, 2e-5)):
                assert_matches_the_scan_path("native", kind, size, dtype, tol)
                if in_loop:
                    assert_forward_matches_the_scan_path("native", kind, size, dtype, tol)
"""


def _cpu_has(flag: str) -> bool:
    """Whether the CPU the library is built for (-march=native) has ``flag``."""
    return flag in native._FLAGS


@pytest.mark.skipif(
    not (_cpu_has("avx2") and _cpu_has("avx512f")),
    reason="needs an x86-64 CPU with AVX-512; without it the default build is the AVX2 one "
    "(test_avx2_tiles_match_the_scan_path)",
)
def test_avx2_build_matches_the_scan_path(tmp_path):
    """The kernels as a CPU without AVX-512 builds them (32-byte vectors, 6 x 2 tiles), here built
    with -mno-avx512f, against the lax.scan path on AVX2_SIZES."""
    env = dict(os.environ, JLSTM_CXXFLAGS="-mno-avx512f", JLSTM_CACHE=str(tmp_path))
    script = [_AVX2_SCRIPT, str(ROOT / "tests"), repr(AVX2_SIZES)]
    subprocess.run([sys.executable, "-c", *script], env=env, cwd=ROOT, check=True)


@pytest.mark.skipif(
    not _cpu_has("avx2") or _cpu_has("avx512f"),
    reason="needs an x86-64 CPU with AVX2 and no AVX-512, whose default build is the AVX2 one; "
    "with AVX-512, test_avx2_build_matches_the_scan_path builds it apart",
)
@pytest.mark.parametrize("backward", ["weights-in-loop", "gates-out-blas"], indirect=True)
@pytest.mark.parametrize("size", AVX2_SIZES, ids=lambda s: "L{}-N{}-I{}-H{}".format(*s))
@KINDS
def test_avx2_tiles_match_the_scan_path(kind, size, backward):
    """The sizes of test_avx2_build_matches_the_scan_path, on the library this process built, which
    a CPU without AVX-512 builds with the AVX2 kernels: in this process, where the grid's problems
    and references are kept, rather than in a process and a build of its own."""
    for dtype, tol in ((jnp.float64, 1e-12), (jnp.float32, 2e-5)):
        assert_matches_the_scan_path("native", kind, size, dtype, tol)
        if backward == "weights-in-loop":
            assert_forward_matches_the_scan_path("native", kind, size, dtype, tol)


def test_results_do_not_depend_on_the_number_of_threads(tmp_path):
    """Each thread owns a block of units; how the units are split must not change a single bit,
    nor, at inference, how a bidirectional LSTM layer's team splits between its directions (one
    thread: one after the other; two: one each; three: one and two)."""
    results = []
    for threads in (1, 2, 3):
        out = tmp_path / f"t{threads}.npz"
        env = dict(os.environ, JLSTM_NATIVE_THREADS=str(threads))
        subprocess.run(
            [sys.executable, "-c", _THREADS_SCRIPT, str(out)], env=env, cwd=ROOT, check=True
        )
        with np.load(out) as data:
            results.append({k: data[k] for k in data.files})
    for other in results[1:]:
        assert_trees_close(other, results[0], rtol=0, atol=0)


@KINDS
def test_long_sequence_stays_finite(kind):
    params, x, state = _problem(kind, 5000, 2, 3, 16, jnp.float32)
    value, grads = _value_and_grads(kind, params, 3 * x, state, "native")
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves((value, grads)))


def test_auto_falls_back_when_native_is_unavailable(monkeypatch):
    params, x, state = _problem("lstm", 3, 2, 4, 6, jnp.float32)
    monkeypatch.setattr(native, "unavailable_reason", lambda: "no compiler (test)")
    jax.clear_caches()  # the layer stack is jitted: retrace with the patched availability
    text = jax.jit(lambda p: jlstm.lstm(p, x, state)[0]).lower(params).as_text()
    assert "jlstm_" not in text
    with pytest.raises(
        ValueError,
        match=r"impl='native' \(the C\+\+ CPU loop\) cannot run this call: it is not available "
        r"here: no compiler \(test\); use impl='auto'",
    ):
        jlstm.lstm(params, x, state, impl="native")
    jax.clear_caches()


def test_build_without_a_compiler_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", "no-such-compiler-jlstm")
    monkeypatch.setenv("JLSTM_CACHE", str(tmp_path))
    with pytest.raises(native.NativeUnavailable, match=r"no C\+\+ compiler \('no-such-compiler"):
        native.build()


def test_build_caches_by_content(monkeypatch, tmp_path):
    """A fresh cache compiles once; the second build returns the same file without compiling."""
    monkeypatch.setenv("JLSTM_CACHE", str(tmp_path))
    first = native.build()
    assert first.parent == tmp_path and first.exists()
    monkeypatch.setenv("CXX", "no-such-compiler-jlstm")  # would fail if it compiled again
    assert native.build() == first


def test_a_header_is_part_of_the_cache_key(monkeypatch, tmp_path):
    """Editing csrc/gate_math.h (included by recurrence.cc) must rebuild the library."""
    before = native._library_path()
    header = tmp_path / "gate_math.h"
    header.write_bytes(native.HEADERS[0].read_bytes() + b"\n// edited\n")
    monkeypatch.setattr(native, "HEADERS", (header,))
    assert native._library_path() != before


@pytest.mark.skipif(not _cpu_has("avx2"), reason="needs an x86-64 CPU with AVX2")
def test_float32_gate_functions_hold_their_error_bounds(tmp_path):
    """csrc/gate_math.h's tanh and sigmoid, vectorised with the loop's own flags, over every 97th
    float32 bit pattern of either sign (44 million values, every binade) against double-precision
    libm: the bounds its header states (tanh 5.6 ulp, sigmoid 2.4 ulp, measured), and the special
    values: +-1 and 0/1 at +-inf (the sigmoid's clamp gives 6e-39 for 0), NaN stays NaN."""
    exe = tmp_path / "gate_math_check"
    flags = [f for f in native.FLAGS if f not in ("-shared", "-fPIC")]
    source = ROOT / "tests" / "gate_math_check.cc"
    compiler = os.environ.get("CXX", "c++")
    cmd = [compiler, *flags, f"-I{native.SOURCE.parent}", str(source), "-o", str(exe)]
    subprocess.run(cmd, check=True)
    out = subprocess.run([str(exe), "97"], check=True, capture_output=True, text=True).stdout
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()}
    assert int(rows["values"][0]) > 40_000_000
    assert float(rows["tanh_ulp"][0]) <= 6.0, out
    assert float(rows["sigmoid_ulp"][0]) <= 2.5, out
    assert float(rows["sigmoid_far_error_in_min_normals"][0]) <= 1.0, out
    special = rows["tanh(+inf)"]  # tanh(+inf) 1 tanh(-inf) -1 sigmoid(+inf) 1 sigmoid(-inf) 6e-39
    assert special[:-1] == ["1", "tanh(-inf)", "-1", "sigmoid(+inf)", "1", "sigmoid(-inf)"], out
    assert 0 <= float(special[-1]) < 1e-38, out
    assert [v.lstrip("-") for v in rows["tanh(nan)"][::2]] == ["nan", "nan"], out
