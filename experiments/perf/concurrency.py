# ruff: noqa: E741, N806, B023  (B, T, I, H as in the issue; loop closures run within their iteration)
"""Backs BENCHMARKS.md's "a large GEMM outside a loop runs on both cores" figures:
``python -m experiments.perf.concurrency``. Does XLA CPU use both cores? Wall and process CPU time
(CPU ≈ 2× wall means two busy cores).

1. One large GEMM (8192×512 @ 512×4096) outside any loop: XLA vs torch (2 threads).
2. An LSTM forward over experiments.bench's long case written three ways: one step as usual;
   the batch split into two independent halves per step; the gate columns split into two dots.
   If XLA ran independent work inside a loop body on two threads, the split versions would be
   faster in wall time and use more CPU time than wall time.
"""

import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax import lax

from experiments.bench.cases import CASES
from experiments.bench.timing import max_rel_err
from experiments.perf.common import report, round_robin

LONG = CASES["long"]
B, T, I, H = LONG.batch, LONG.seq_len, LONG.input_size, LONG.hidden_size


def gemm():
    a, b = jnp.ones((8192, 512)), jnp.ones((512, 4096))
    f = jax.jit(lambda a, b: a @ b)
    torch.set_num_threads(2)
    at, bt = torch.ones(8192, 512), torch.ones(512, 4096)
    med = round_robin({"XLA": lambda: f(a, b), "torch (2 threads)": lambda: at @ bt}, samples=5)
    report("8192x512 @ 512x4096 float32", med, "XLA")
    for name, (wall, _) in med.items():
        print(f"  {name}: {2 * 8192 * 512 * 4096 / wall / 1e9:.0f} GFLOP/s")


def lstm_variants():
    k = jax.random.split(jax.random.key(0), 3)
    w_ih = jax.random.normal(k[0], (I, 4 * H)) * 0.1
    w_hh = jax.random.normal(k[1], (H, 4 * H)) * 0.1
    x = jax.random.normal(k[2], (T, B, I))

    def cell(h, c, xt, w_ih, w_hh):
        i, f, g, o = jnp.split(xt @ w_ih + h @ w_hh, 4, axis=-1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        return jax.nn.sigmoid(o) * jnp.tanh(c), c

    def plain(x):
        def step(carry, xt):
            h, c = cell(*carry, xt, w_ih, w_hh)
            return (h, c), h

        z = jnp.zeros((B, H))
        return lax.scan(step, (z, z), x)[1]

    def batch_halves(x):
        def step(carry, xt):
            new = tuple(cell(h, c, xj, w_ih, w_hh) for (h, c), xj in zip(carry, xt, strict=True))
            return new, tuple(h for h, _ in new)

        z = jnp.zeros((B // 2, H))
        halves = (x[:, : B // 2], x[:, B // 2 :])
        return jnp.concatenate(lax.scan(step, ((z, z), (z, z)), halves)[1], axis=1)

    def column_halves(x):
        # i, f from one dot and g, o from another: two independent dots per step
        def step(carry, xt):
            h, c = carry
            i_f = xt @ w_ih[:, : 2 * H] + h @ w_hh[:, : 2 * H]
            g_o = xt @ w_ih[:, 2 * H :] + h @ w_hh[:, 2 * H :]
            i, f = jnp.split(jax.nn.sigmoid(i_f), 2, axis=-1)
            g, o = jnp.tanh(g_o[:, :H]), jax.nn.sigmoid(g_o[:, H:])
            c = f * c + i * g
            return (o * jnp.tanh(c), c), o * jnp.tanh(c)

        z = jnp.zeros((B, H))
        return lax.scan(step, (z, z), x)[1]

    fns = {
        n: jax.jit(f)
        for n, f in [
            ("one step", plain),
            ("batch halves", batch_halves),
            ("column halves", column_halves),
        ]
    }
    want = np.asarray(fns["one step"](x))
    for name, f in fns.items():
        assert max_rel_err({"y": f(x)}, {"y": want}) < 1e-5, name
    med = round_robin({n: (lambda f=f: f(x)) for n, f in fns.items()})
    report(f"LSTM forward, (B,T,I,H)={B, T, I, H}", med, "one step", per=T)


if __name__ == "__main__":
    gemm()
    lstm_variants()
