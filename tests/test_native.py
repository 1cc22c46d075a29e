"""The C++ LSTM and GRU loops (jlstm.native): the path impl="auto" takes on CPU gives the lax.scan
path's outputs, states and gradients on a grid that crosses the kernel's edges (1 unit, thread blocks of
16 units, register tiles of 8 rows), with any number of threads, under vmap and concurrent calls;
and it is refused, or skipped by auto, where it cannot run. Torch parity of both paths is in
test_torch_parity.py."""

import concurrent.futures
import os
import re
import subprocess
import sys
import tempfile
import warnings
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
    """JLSTM_NATIVE_ISA=off: auto takes the fused loop without a warning (a choice, not a fault;
    pytest makes any warning an error)."""
    params, x, state = _problem(kind, 3, 2, 4, 5, jnp.float32)
    monkeypatch.setenv("JLSTM_NATIVE_ISA", "off")
    native._warned.clear()
    jax.clear_caches()
    fn = lambda p, x: jnp.sum(LAYERS[kind][0](p, x, state)[0])  # noqa: E731
    assert "jlstm_" not in jax.jit(fn).lower(params, x).as_text()
    with pytest.raises(
        ValueError, match=r"not available here: JLSTM_NATIVE_ISA=off turns the C\+\+ loop off"
    ):
        LAYERS[kind][0](params, x, state, impl="native")
    jax.clear_caches()


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
    gradients, and a warning says so once."""
    monkeypatch.setattr(native, "WEIGHTS_IN_LOOP_BYTES", 0)
    params, x, state = _problem("gru", 4, 3, 5, 6, jnp.float64, layers=2, bidirectional=True)
    loss = lambda p, x: jnp.sum(jnp.sin(jlstm.gru(p, x, state)[0]))  # noqa: E731
    grads = {}
    native._warned.clear()
    for reason in (None, "scipy-openblas32 is not installed (test)"):
        monkeypatch.setattr(native, "blas_unavailable_reason", lambda reason=reason: reason)
        jax.clear_caches()
        grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            text = grad.lower(params, x).as_text()
        assert ("jlstm_sequence_grads" in text) == (reason is None)
        assert [str(w.message) for w in caught if w.category is native.NativeFallbackWarning] == (
            [] if reason is None else [_fallback_message("blas", reason)]
        )
        grads[reason] = grad(params, x)
    assert_trees_close(*grads.values(), rtol=1e-12, atol=1e-12)
    native._warned.clear()
    jax.clear_caches()


def _fallback_message(cause, reason):
    costs = {
        "loop": "impl='auto' runs the pure-JAX loop (impl='fused') on CPU instead, which takes "
        "1.3-2x the C++ loop's time",
        "blas": "a large layer's backward forms its weight gradients with XLA's GEMMs instead, "
        "whose train step took up to 1.14x the time with OpenBLAS's",
    }
    return (
        f"jlstm: {costs[cause]}: {reason}. (`python -m jlstm.native` says what runs; "
        "docs/native_build.md)"
    )


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
assert native.available() and native.loaded().level == "avx2", native.unavailable_reason()
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
    """Whether this CPU has ``flag`` (the library's level is chosen from the same flags)."""
    return flag in native._FLAGS


@pytest.mark.skipif(
    not (_cpu_has("avx2") and _cpu_has("avx512f")),
    reason="needs an x86-64 CPU with AVX-512; without it the level loaded is the AVX2 one "
    "(test_avx2_tiles_match_the_scan_path)",
)
def test_avx2_level_matches_the_scan_path():
    """The AVX2 level (32-byte vectors, 6 x 2 tiles), forced on this AVX-512 CPU through
    JLSTM_NATIVE_ISA=avx2, against the lax.scan path: the grid's sizes and AVX2_SIZES, weights in
    the loop and gates out, in a process of its own (a process loads one level)."""
    env = dict(os.environ, JLSTM_NATIVE_ISA="avx2")
    script = [_AVX2_SCRIPT, str(ROOT / "tests"), repr(SIZES + AVX2_SIZES)]
    subprocess.run([sys.executable, "-c", *script], env=env, cwd=ROOT, check=True)


@pytest.mark.skipif(
    not _cpu_has("avx2") or _cpu_has("avx512f"),
    reason="needs an x86-64 CPU with AVX2 and no AVX-512, whose level is the AVX2 one; with "
    "AVX-512, test_avx2_level_matches_the_scan_path forces it in a process of its own",
)
@pytest.mark.parametrize("backward", ["weights-in-loop", "gates-out-blas"], indirect=True)
@pytest.mark.parametrize("size", AVX2_SIZES, ids=lambda s: "L{}-N{}-I{}-H{}".format(*s))
@KINDS
def test_avx2_tiles_match_the_scan_path(kind, size, backward):
    """The AVX2 sizes on the level this process loaded, the AVX2 one on a CPU without AVX-512: in
    this process, where the grid's problems and references are kept."""
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
    """Where the library cannot load, auto takes the fused loop and warns, once per process (a
    second layer, a second call: no second warning); impl="native" says why it cannot run."""
    params, x, state = _problem("lstm", 3, 2, 4, 6, jnp.float32)
    monkeypatch.setattr(native, "unavailable_reason", lambda: "no library (test)")
    native._warned.clear()
    jax.clear_caches()  # the layer stack is jitted: retrace with the patched availability
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        text = jax.jit(lambda p: jlstm.lstm(p, x, state)[0]).lower(params).as_text()
        gru_params, gru_x, gru_state = _problem("gru", 3, 2, 4, 6, jnp.float32)
        jax.jit(lambda p: jlstm.gru(p, gru_x, gru_state)[0]).lower(gru_params)
    assert "jlstm_" not in text
    warned = [str(w.message) for w in caught if w.category is native.NativeFallbackWarning]
    assert warned == [_fallback_message("loop", "no library (test)")]
    native._warned.clear()
    with pytest.raises(
        ValueError,
        match=r"impl='native' \(the C\+\+ CPU loop\) cannot run this call: it is not available "
        r"here: no library \(test\); use impl='auto'",
    ):
        jlstm.lstm(params, x, state, impl="native")
    jax.clear_caches()


def test_the_isa_level_follows_the_cpu_and_the_override(monkeypatch):
    """The best level whose flags the CPU has, or JLSTM_NATIVE_ISA's; a level the CPU lacks, an
    unknown value and off say why none runs."""
    v3, v4 = native.LEVELS["avx2"].cpu, native.LEVELS["avx512"].cpu
    monkeypatch.setattr(native, "_supported_platform", lambda: None)
    cases = [
        (v4, "", "avx512", r"the best level this CPU runs$"),
        (v4, "avx2", "avx2", r"JLSTM_NATIVE_ISA=avx2$"),
        (
            v3,
            "",
            "avx2",
            r"the best level this CPU runs; it lacks avx512bw, avx512cd, .* of avx512",
        ),
        (v3, "avx512", None, r"JLSTM_NATIVE_ISA=avx512, but this CPU lacks avx512bw, avx512cd"),
        (v3 - {"fma"}, "", None, r"this CPU lacks fma \(x86-64-v3\)"),
        (v4, "sse", None, r"JLSTM_NATIVE_ISA must be one of avx512, avx2, off \(or unset\)"),
        (v4, "off", None, r"JLSTM_NATIVE_ISA=off turns the C\+\+ loop off"),
    ]
    for flags, asked, level, why in cases:
        monkeypatch.setattr(native, "_FLAGS", frozenset(flags))
        monkeypatch.setenv("JLSTM_NATIVE_ISA", asked)
        got = native.isa_choice()
        assert got[0] == level and re.match(why, got[1]), (asked, got)


def test_the_wheel_builds_the_levels_this_module_names():
    """CMakeLists.txt compiles each level of native.LEVELS with that level's flags."""
    cmake = (ROOT / "CMakeLists.txt").read_text()
    assert f"set(JLSTM_LEVELS {' '.join(sorted(native.LEVELS))})" in cmake
    for name, level in native.LEVELS.items():
        assert f"set(JLSTM_FLAGS_{name} {' '.join(level.flags)})" in cmake
    common = [f for f in native.FLAGS if f.startswith(("-O", "-f")) and f != "-fPIC"]
    assert f"set(JLSTM_COMMON_FLAGS {' '.join(common)})" in cmake


def test_a_library_compiled_from_other_sources_is_refused(monkeypatch, tmp_path):
    """The installed library carries its sources' digest; edited sources (an editable install
    not rebuilt) make it refuse to run, saying how to rebuild."""
    path = native.loaded().path
    library = native._load()
    assert native._stale_reason(path, library) is None
    for source in native.SOURCES.iterdir():
        (tmp_path / source.name).write_bytes(source.read_bytes())
    (tmp_path / "gate_math.h").write_bytes(b"// edited\n" + (tmp_path / "gate_math.h").read_bytes())
    monkeypatch.setattr(native, "SOURCES", tmp_path)
    assert re.match(
        r".* was compiled from other sources .* `pip install -e \.`",
        native._stale_reason(path, library),
    )


def test_build_without_a_compiler_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", "no-such-compiler-jlstm")
    monkeypatch.setenv("JLSTM_CACHE", str(tmp_path))
    with pytest.raises(native.NativeUnavailable, match=r"no C\+\+ compiler \('no-such-compiler"):
        native.build()


def test_the_build_cache_honours_xdg_and_survives_a_read_only_home(monkeypatch, tmp_path):
    monkeypatch.delenv("JLSTM_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert native._cache_dir() == tmp_path / "xdg" / "jlstm"
    (tmp_path / "file").write_text("")  # nothing can be created below a file, even by root
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file" / "cache"))
    assert native._cache_dir().parent == Path(tempfile.gettempdir())


def test_a_header_is_part_of_the_cache_key(monkeypatch, tmp_path):
    """Editing csrc/gate_math.h (included by recurrence.cc) must rebuild the library."""
    before = native._library_path("avx2", "c++")
    for source in native.SOURCES.iterdir():
        (tmp_path / source.name).write_bytes(source.read_bytes() + b"\n// edited\n")
    monkeypatch.setattr(native, "SOURCES", tmp_path)
    assert native._library_path("avx2", "c++") != before


_BUILD = "from jlstm import native; print(native.build('avx2'))"


def test_concurrent_builds_compile_once_and_evict_old_ones(tmp_path):
    """JLSTM_NATIVE_BUILD's compile: two processes starting at once with an empty cache compile
    once (a lock) and find the same library; a third finds it built; the cache keeps the
    KEEP_BUILDS most recently used builds. The compiler is a wrapper that logs its compiles."""
    cache, log = tmp_path / "cache", tmp_path / "compiles"
    cxx = tmp_path / "cxx"
    cxx.write_text(f'#!/bin/sh\ncase "$*" in *" -o "*) echo x >> {log};; esac\nexec c++ "$@"\n')
    cxx.chmod(0o755)
    cache.mkdir()
    for i in range(native.KEEP_BUILDS):  # older builds, as earlier versions left them
        old = cache / f"recurrence-old{i}.so"
        old.write_bytes(b"")
        os.utime(old, (1000 + i, 1000 + i))
    env = dict(os.environ, CXX=str(cxx), JLSTM_CACHE=str(cache))
    run = [sys.executable, "-c", _BUILD]
    both = [subprocess.Popen(run, env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    paths = {p.communicate()[0].strip() for p in both}
    assert all(p.returncode == 0 for p in both)
    third = subprocess.run(run, env=env, capture_output=True, text=True, check=True).stdout
    assert len(paths) == 1 and third.strip() in paths
    assert log.read_text().count("x") == 1
    left = sorted(p.name for p in cache.glob("recurrence-*.so"))
    assert len(left) == native.KEEP_BUILDS and "recurrence-old0.so" not in left


@pytest.mark.skipif(not _cpu_has("avx2"), reason="needs an x86-64 CPU with AVX2")
def test_float32_gate_functions_hold_their_error_bounds(tmp_path):
    """csrc/gate_math.h's tanh and sigmoid, vectorised with the loop's own flags, over every 97th
    float32 bit pattern of either sign (44 million values, every binade) against double-precision
    libm: the bounds its header states (tanh 5.6 ulp, sigmoid 2.4 ulp, measured), and the special
    values: +-1 and 0/1 at +-inf (the sigmoid's clamp gives 6e-39 for 0), NaN stays NaN."""
    exe = tmp_path / "gate_math_check"
    level_flags = native.build_flags(native.loaded().level)
    flags = [f for f in level_flags if f not in ("-shared", "-fPIC")]
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
