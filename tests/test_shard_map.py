"""The layers inside ``jax.shard_map`` with the batch split over devices and the weights replicated:
outputs, final states and gradients equal the unsharded call, on every path (the C++ and fused
loops for LSTM and GRU, autodiff LSTM and RNN, with lengths, with zero or given initial states).

The devices are 2 virtual CPU devices, which only exist if configured before JAX starts, so the
checks run in a fresh Python process (``CHILD``) that prints the largest differences as JSON.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent

CHILD = r"""
import json
import jax
jax.config.update("jax_num_cpu_devices", 2)
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P
import jlstm

mesh = Mesh(np.array(jax.devices()), ("b",))
T, N, I, H = 5, 4, 3, 6
keys = jax.random.split(jax.random.PRNGKey(0), 6)
x = jax.random.normal(keys[0], (T, N, I))
cot = jax.random.normal(keys[1], (T, N, 2 * H))
lengths = jnp.array([5, 2, 0, 4])
BATCH = P(None, "b")  # time-major x: split the batch axis

def run(fn, init, with_state, with_lengths, impl):
    p = init(keys[2], I, H, num_layers=2, bidirectional=True, dtype=jnp.float64)
    h0 = jax.random.normal(keys[3], (4, N, H))
    state = None
    if with_state:
        state = (h0, jax.random.normal(keys[4], (4, N, H))) if fn is jlstm.lstm else h0

    def call(p, x, state, lengths):
        out, final = fn(p, x, state, seq_lengths=lengths, impl=impl)
        return out, final

    state_spec = None if state is None else jax.tree.map(lambda _: P(None, "b"), state)
    lengths_spec = None if not with_lengths else P("b")
    sharded = jax.shard_map(
        call, mesh=mesh,
        in_specs=(P(), BATCH, state_spec, lengths_spec),
        out_specs=(BATCH, jax.tree.map(lambda _: P(None, "b"), fn(p, x)[1])),
    )
    lens = lengths if with_lengths else None

    def loss(f):
        return lambda p, x, state: jnp.sum(f(p, x, state, lens)[0] * cot)

    got = jax.jit(sharded)(p, x, state, lens), jax.jit(jax.grad(loss(sharded), (0, 1, 2)))(p, x, state)
    want = call(p, x, state, lens), jax.grad(loss(call), (0, 1, 2))(p, x, state)
    diffs = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), got, want)
    return max(jax.tree.leaves(diffs))

# (cell, impl, zero or given initial state, with lengths): every path, each state and length option
COMBOS = [("lstm", "auto", s, l) for s in (0, 1) for l in (0, 1)] + [
    ("lstm", "scan", 0, 1), ("gru", "auto", 0, 1), ("gru", "auto", 1, 0), ("rnn", "auto", 0, 1),
    ("lstm", "fused", 1, 1), ("gru", "fused", 0, 1)]
FNS = {"lstm": (jlstm.lstm, jlstm.init_lstm), "gru": (jlstm.gru, jlstm.init_gru),
       "rnn": (jlstm.rnn, jlstm.init_rnn)}
results = {f"{c}-{i}-state{s}-lengths{l}": run(*FNS[c], s, l, i) for c, i, s, l in COMBOS}
print(json.dumps(results))
"""


def test_sharded_batch_matches_unsharded():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == 10
    bad = {k: v for k, v in results.items() if not v < 1e-12}
    assert not bad, bad
