"""``jax.export`` and ahead-of-time lowering from this CPU host for every platform: the choice of
implementation is made per lowering platform (jlstm.backends), so a program exported for cuda,
rocm or tpu holds no C++ custom call, Pallas exported for cuda holds its Triton kernels, and an
explicit ``impl`` that cannot lower for the target says so in jlstm's words. Exported for CPU,
``impl="auto"`` gives a portable program (the fused loop where a jitted call runs the C++ one),
which runs in a process without jlstm; ``impl="native"`` exports the C++ calls on request."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from trees import assert_trees_close

import jlstm
from jlstm import backends, native

LAYERS = {"lstm": (jlstm.lstm, jlstm.init_lstm), "gru": (jlstm.gru, jlstm.init_gru)}
TRITON = "__gpu$xla.gpu.triton"


def _problem(kind, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(0), 4)
    params = LAYERS[kind][1](keys[0], 3, 5, num_layers=2, bidirectional=True, dtype=dtype)
    x = jax.random.normal(keys[1], (4, 6, 3), dtype)  # batch-first
    h0 = jax.random.normal(keys[2], (4, 4, 5), dtype)
    state = (h0, jax.random.normal(keys[3], (4, 4, 5), dtype)) if kind == "lstm" else h0
    return params, x, state, jnp.array([6, 1, 0, 4])


def _functions(kind, impl="auto"):
    """The jitted forward and training step (value_and_grad) of a 2-layer bidirectional layer."""

    def forward(params, x, state, lengths):
        return LAYERS[kind][0](params, x, state, batch_first=True, seq_lengths=lengths, impl=impl)

    def loss(params, x, state, lengths):
        return jnp.mean(forward(params, x, state, lengths)[0] ** 2)

    return {"forward": jax.jit(forward), "train": jax.jit(jax.value_and_grad(loss, (0, 1, 2)))}


@pytest.mark.parametrize("platform", ["cuda", "rocm", "tpu"])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_export_for_accelerators_serializes_without_cpu_custom_calls(kind, platform):
    args = _problem(kind)
    for name, fn in _functions(kind).items():
        exported = export.export(fn, platforms=[platform])(*args)
        assert "jlstm_" not in exported.mlir_module(), (name, platform)
        restored = export.deserialize(exported.serialize())
        assert restored.platforms == (platform,)
        assert restored.in_avals == exported.in_avals
        assert restored.out_avals == exported.out_avals


@pytest.mark.parametrize("kind", list(LAYERS))
def test_pallas_exported_for_cuda_holds_the_triton_kernels(kind):
    """2 layers x 2 directions x (forward that saves, backward) Triton calls; Triton custom calls
    carry no compatibility guarantee, so the check is disabled by name."""
    args = _problem(kind)
    fn = _functions(kind, "pallas")["train"]
    exported = export.export(
        fn, platforms=["cuda"], disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON)]
    )(*args)
    text = exported.mlir_module()
    assert text.count(f"@{TRITON}(") == 8
    assert "jlstm_" not in text
    export.deserialize(exported.serialize())


@pytest.mark.parametrize("kind", list(LAYERS))
def test_cpu_export_portable_by_default_and_with_the_cpp_loop_on_request(kind):
    """CPU exports both ways (docs/native_build.md): the default (auto) gives a portable program
    with no disabled check although a jitted call runs the C++ loop; impl="native" exports the C++
    loop's custom calls, which must be allowed by name. Each round trip gives the direct call's
    numbers: the same bits from the C++ loop, float64 rounding from the fused loop."""
    args = _problem(kind, jnp.float64)
    for impl, checks, tol in (("auto", [], 1e-12), ("native", native.export_checks(), 0)):
        for name, fn in _functions(kind, impl).items():
            assert "jlstm_" in fn.lower(*args).as_text(), (impl, name)  # jitted: the C++ loop
            exported = export.export(fn, platforms=["cpu"], disabled_checks=checks)(*args)
            assert ("jlstm_" in exported.mlir_module()) == (impl == "native"), (impl, name)
            restored = export.deserialize(exported.serialize())
            assert_trees_close(restored.call(*args), fn(*args), rtol=tol, atol=tol)


def test_cpu_export_of_the_cpp_loop_needs_its_checks_disabled():
    fn = _functions("lstm", "native")["forward"]
    with pytest.raises(ValueError, match=r"custom calls whose targets have no compatibility"):
        export.export(fn, platforms=["cpu"])(*_problem("lstm"))


_LOAD_AND_RUN = """
import sys
sys.modules["jlstm"] = None  # this process cannot import jlstm, nor load its C++ library
import jax, numpy as np
from jax import export
jax.config.update("jax_enable_x64", True)
for name in sys.argv[2].split(","):
    restored = export.deserialize(open(f"{sys.argv[1]}/{name}.bin", "rb").read())
    with np.load(f"{sys.argv[1]}/{name}-args.npz") as data:
        leaves = [data[f"arr_{i}"] for i in range(len(data.files))]
    args, kwargs = jax.tree.unflatten(restored.in_tree, leaves)
    np.savez(f"{sys.argv[1]}/{name}-out.npz", *jax.tree.leaves(restored.call(*args, **kwargs)))
"""


def test_cpu_export_of_auto_runs_without_jlstm(tmp_path):
    """The default CPU export of float32 LSTM and GRU (2 bidirectional layers, seq_lengths with a
    0), forward and value_and_grad, runs in a process that cannot import jlstm, and gives the
    jitted call's numbers (the C++ loop's) to float32 rounding."""
    names, want = [], {}
    for kind in LAYERS:
        args = _problem(kind)
        for name, fn in _functions(kind).items():
            assert "jlstm_" in fn.lower(*args).as_text()
            exported = export.export(fn, platforms=["cpu"])(*args)
            names.append(f"{kind}-{name}")
            (tmp_path / f"{names[-1]}.bin").write_bytes(exported.serialize())
            np.savez(tmp_path / f"{names[-1]}-args.npz", *jax.tree.leaves(args))
            want[names[-1]] = jax.tree.leaves(fn(*args))
    script = textwrap.dedent(_LOAD_AND_RUN)
    env = dict(os.environ, JLSTM_NATIVE_ISA="off")
    subprocess.run(
        [sys.executable, "-c", script, str(tmp_path), ",".join(names)],
        env=env,
        cwd=tmp_path,
        check=True,
    )
    for name in names:
        with np.load(tmp_path / f"{name}-out.npz") as data:
            got = [data[f"arr_{i}"] for i in range(len(data.files))]
        assert len(got) == len(want[name]) > 1, name
        assert_trees_close(got, want[name], rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_ahead_of_time_lowering_for_another_platform(kind, platform):
    args = _problem(kind)
    for fn in _functions(kind).values():
        text = fn.trace(*args).lower(lowering_platforms=(platform,)).as_text()
        assert "jlstm_" not in text and "stablehlo.while" in text


@pytest.mark.parametrize(
    "impl,platform,match",
    [
        (
            "native",
            "cuda",
            r"lstm: impl='native' \(the C\+\+ CPU loop\) does not lower for cuda; it lowers for "
            r"cpu: use impl='auto' \(on cuda: impl='fused'\)",
        ),
        (
            "pallas",
            "tpu",
            r"lstm: impl='pallas' \(the Pallas kernels\) does not lower for tpu; it lowers for "
            r"cuda, cpu: use impl='auto' \(on tpu: impl='fused'\)",
        ),
    ],
)
def test_explicit_impl_refused_for_a_platform_it_does_not_lower_for(impl, platform, match):
    fn = _functions("lstm", impl)["train"]
    with pytest.raises(ValueError, match=match):
        fn.trace(*_problem("lstm")).lower(lowering_platforms=(platform,))
    with pytest.raises(ValueError, match=match):
        export.export(fn, platforms=[platform])(*_problem("lstm"))


def test_cudnn_needs_jaxs_cuda_plugin():
    params, x, state, _ = _problem("lstm")
    with pytest.raises(
        ValueError,
        match=r"impl='cudnn' .* cannot run this call: it is not available here: this jaxlib has "
        r"no cuDNN RNN support .*; use impl='auto'",
    ):
        jlstm.lstm(params, x, state, batch_first=True, impl="cudnn")


def test_cudnn_refused_for_a_platform_it_does_not_lower_for(cudnn_on_cpu):
    """With jax.experimental.rnn's reference standing in (lowering for cuda and, here, cpu)."""
    fn = _functions("lstm", "cudnn")["train"]
    fn(*_problem("lstm"))  # lowers for this CPU
    with pytest.raises(
        ValueError,
        match=r"impl='cudnn' \(cuDNN through jax.experimental.rnn\) does not lower for tpu; it "
        r"lowers for cuda, cpu: use impl='auto' \(on tpu: impl='fused'\)",
    ):
        fn.trace(*_problem("lstm")).lower(lowering_platforms=("tpu",))


def test_auto_choice_per_platform():
    call = backends.Call("lstm", 0, np.dtype(np.float32), 64, 28)
    assert backends.auto_choice("cpu", call) == "native"
    for platform in ("cuda", "rocm", "tpu"):
        assert backends.auto_choice(platform, call) == "fused"
        assert backends.auto_choice(platform, call._replace(kind="gru")) == "fused"
    assert backends.auto_choice("cpu", call._replace(length=0)) == "fused"
    assert backends.auto_choice("cpu", call._replace(dtype=np.dtype(jnp.bfloat16))) == "fused"
    assert backends.auto_choice("cuda", call._replace(proj_size=8)) == "scan"
    assert backends.auto_choice("cpu", call._replace(kind="rnn")) == "scan"


def test_one_table_names_every_impl():
    assert backends.IMPLS == ("auto", "native", "pallas", "cudnn", "fused", "scan")
    for backend in backends.BACKENDS.values():
        assert set(backend.auto) <= set(backend.platforms), backend.name
        assert (backend.direction is None) != (backend.layer is None), backend.name
