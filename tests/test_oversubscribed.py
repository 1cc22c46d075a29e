"""The C++ loop beside busy cores: its team meets at a barrier every step, and a member that loses
its core to another process, or to a thread of the same process (a library's pool that spins after
its own work, as torch's OpenMP team does), must only slow it down, never change a value. Every
core here is kept busy while the loop runs, so the team's members are preempted mid-step and its
waiters give way (csrc/recurrence.cc, spin_pause)."""

import contextlib
import ctypes
import os
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlstm
from jlstm import native

pytestmark = pytest.mark.skipif(not native.available(), reason="the C++ loop is not available")

LAYERS = {"lstm": (jlstm.lstm, jlstm.init_lstm), "gru": (jlstm.gru, jlstm.init_gru)}


@contextlib.contextmanager
def spinning_processes(count):
    """``count`` processes that spin on a core each until the block ends."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield
    finally:
        for p in spinners:
            p.kill()
            p.wait()


@contextlib.contextmanager
def busy_threads(count):
    """``count`` threads of this process that keep a core each busy until the block ends: each
    fills an 8 MiB buffer over and over in C (libc's memset, called through ctypes, which lets go
    of the GIL), so they run beside the loop's team as a library's spinning pool does."""
    memset = ctypes.CDLL(None).memset
    memset.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t)
    stop = threading.Event()
    buffers = [ctypes.create_string_buffer(8 << 20) for _ in range(count)]

    def spin(buffer):
        while not stop.is_set():
            memset(buffer, 1, len(buffer))

    threads = [threading.Thread(target=spin, args=(b,), daemon=True) for b in buffers]
    for t in threads:
        t.start()
    try:
        yield
    finally:
        stop.set()
        for t in threads:
            t.join()


NEIGHBOURS = {"processes": spinning_processes, "threads": busy_threads}


@pytest.mark.parametrize("neighbour", sorted(NEIGHBOURS))
@pytest.mark.parametrize("kind", ["lstm", "gru"])
# Sizes with the weight gradients summed in the loop, and handed out to whole-sequence GEMMs.
@pytest.mark.parametrize("size", [(40, 3, 8, 64), (12, 16, 32, 512)])
def test_the_loop_beside_busy_cores_gives_the_scan_paths_numbers(kind, size, neighbour):
    layer, init = LAYERS[kind]
    length, batch, inp, hidden = size
    params = init(jax.random.key(0), inp, hidden, num_layers=2, bidirectional=True)
    x = jax.random.normal(jax.random.key(1), (length, batch, inp))
    lengths = jnp.arange(batch) % (length + 1)

    def loss(params, x, impl):
        out, _ = layer(params, x, seq_lengths=lengths, impl=impl)
        return jnp.sum(jnp.sin(out))

    def run(impl):
        fwd = jax.jit(lambda p, x: layer(p, x, seq_lengths=lengths, impl=impl))
        grad = jax.jit(jax.value_and_grad(lambda p, x: loss(p, x, impl), argnums=(0, 1)))
        return lambda: (fwd(params, x), grad(params, x))

    want = jax.block_until_ready(run("scan")())
    native_run = run("native")
    jax.block_until_ready(native_run())  # compiled before the cores are taken
    with NEIGHBOURS[neighbour](len(os.sched_getaffinity(0))):
        got = [jax.block_until_ready(native_run()) for _ in range(3)]
    for each in got:
        for g, w in zip(jax.tree.leaves(each), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-5)
