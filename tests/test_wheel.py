"""The wheel as a user gets it: ``pip wheel .`` compiles the C++ loop at build time, once per ISA
level; installed into a fresh virtual environment in which every compiler fails, ``impl="auto"``
runs the C++ loop on each level this CPU has (``JLSTM_NATIVE_ISA`` picks one) and equals
``impl="scan"``, ``python -m jlstm.native`` says so, and without the library a warning says what
runs instead. (The wheel is built from this environment's jax and scikit-build-core where it has
them, without build isolation, else as a user's pip builds it, fetching them; in the checkout's
build/ folder, so that a second run compiles nothing.)"""

import importlib.util
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from jlstm import native

ROOT = Path(__file__).parent.parent
LEVELS = [name for name, level in native.LEVELS.items() if level.cpu <= native._FLAGS]

_CHECK = """
import sys, jax, jax.numpy as jnp, numpy as np
import jlstm
from jlstm import native
assert jlstm.__file__.startswith(sys.argv[1]), jlstm.__file__  # the wheel's jlstm, not the checkout's
jax.config.update("jax_enable_x64", True)
for kind, layer, init in (("lstm", jlstm.lstm, jlstm.init_lstm), ("gru", jlstm.gru, jlstm.init_gru)):
    p = init(jax.random.key(0), 3, 20, num_layers=2, bidirectional=True, dtype=jnp.float64)
    x = jax.random.normal(jax.random.key(1), (7, 5, 3), jnp.float64)
    lengths = jnp.array([7, 3, 0, 5, 1])
    loss = lambda p, x, impl: jnp.sum(jnp.sin(layer(p, x, seq_lengths=lengths, impl=impl)[0]))
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)
    text = step.lower(p, x, "auto").as_text()
    assert (f"@jlstm_{kind}_backward(" in text) == (sys.argv[2] == "on"), kind
    got, want = step(p, x, "auto"), step(p, x, "scan")
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12)
"""


def _site_packages(venv: Path) -> Path:
    return venv / Path(sysconfig.get_path("purelib")).relative_to(sys.prefix)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """``(wheel's file names, environment variables, venv python)``: the wheel installed into a
    fresh venv that sees this one's packages (jax, numpy: a .pth file) but not its jlstm, with
    every compiler on PATH (and $CXX) failing."""
    tmp = tmp_path_factory.mktemp("wheel")
    pip = [sys.executable, "-m", "pip", "-q"]
    no_isolation = (
        [] if importlib.util.find_spec("scikit_build_core") is None else ["--no-build-isolation"]
    )
    subprocess.run(
        [*pip, "wheel", "--no-deps", *no_isolation, "-w", str(tmp), str(ROOT)], check=True, cwd=ROOT
    )
    (wheel,) = tmp.glob("jlstm-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = _site_packages(venv)
    (site / "outer.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run([*pip, "--python", str(python), "install", "--no-deps", str(wheel)], check=True)
    broken = tmp / "no-compilers"
    broken.mkdir()
    for name in ("c++", "g++", "cc", "gcc", "clang", "clang++"):
        (broken / name).write_text("#!/bin/sh\nexit 1\n")
        (broken / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{broken}:{os.environ['PATH']}", CXX=str(broken / "c++"))
    env.pop("JLSTM_NATIVE_BUILD", None)
    env.pop("JLSTM_NATIVE_ISA", None)
    return zipfile.ZipFile(wheel).namelist(), env, python, site


def test_the_wheel_holds_a_library_per_level(installed):
    names = installed[0]
    assert {f"jlstm/_recurrence_{level}.so" for level in native.LEVELS} <= set(names)
    assert "jlstm/csrc/recurrence.cc" in names  # for the opt-in build at first use


@pytest.mark.parametrize("level", LEVELS)
def test_auto_runs_each_level_without_a_compiler(installed, level, tmp_path):
    _, env, python, site = installed
    env = dict(env, JLSTM_NATIVE_ISA=level)
    assert subprocess.run([env["CXX"], "--version"]).returncode == 1  # no compiler works here
    report = subprocess.run(
        [python, "-m", "jlstm.native"], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert report.returncode == 0, report.stdout + report.stderr
    assert "the C++ loop is on" in report.stdout
    assert f"ISA level: {level} (JLSTM_NATIVE_ISA={level}" in report.stdout
    assert f"library:   {site}/jlstm/_recurrence_{level}.so (compiled at install)" in report.stdout
    check = [python, "-c", _CHECK, str(site), "on"]
    subprocess.run(check, env=env, cwd=tmp_path, check=True)


def test_without_the_library_auto_warns_once_and_runs_the_fused_loop(installed, tmp_path):
    """The package without its compiled libraries (as a source checkout on sys.path is): one
    NativeFallbackWarning that says why and what it costs, and the scan path's numbers."""
    _, env, python, site = installed
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    libraries = sorted((site / "jlstm").glob("_recurrence_*.so"))
    assert libraries
    for library in libraries:
        library.rename(hidden / library.name)
    try:
        report = subprocess.run(
            [python, "-m", "jlstm.native"], env=env, cwd=tmp_path, capture_output=True, text=True
        )
        assert report.returncode == 1
        assert "the C++ loop is off: jlstm was installed without its compiled library" in (
            report.stdout
        )
        check = [python, "-W", "always", "-c", _CHECK, str(site), "off"]
        done = subprocess.run(check, env=env, cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        warned = [line for line in done.stderr.splitlines() if "NativeFallbackWarning" in line]
        assert len(warned) == 1, done.stderr
        assert (
            "runs the pure-JAX loop (impl='fused') on CPU instead, which takes 1.3-2x"
            in (warned[0])
        )
        assert "installed without its compiled library" in warned[0]
    finally:
        for library in libraries:
            (hidden / library.name).rename(library)
