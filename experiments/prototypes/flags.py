# ruff: noqa: E741, B023  (B, T, I, H as in the issue; loop closures run within their iteration)
"""Time jlstm's core (fwd and train, one layer) under the XLA_FLAGS of this process.

for f in "" "--xla_cpu_use_thunk_runtime=false" ...; do XLA_FLAGS="$f" python -m experiments.prototypes.flags long; done
"""

import os
import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

import jlstm
from experiments.prototypes.common import CASES, compile_fn, rel_err, torch_lstm, torch_reference


def cpu_time(f, n):
    jax.block_until_ready(f())
    best = []
    for _ in range(5):
        t = time.process_time()
        for _ in range(n):
            r = f()
        jax.block_until_ready(r)
        best.append((time.process_time() - t) / n)
    return float(np.median(best))


def main(names):
    out = []
    for name in names:
        B, T, I, H = CASES[name]
        m, p, x, cot = torch_lstm(B, T, I, H)
        want_y, want_g = torch_reference(m, x, cot)
        t0 = time.perf_counter()
        fwd = compile_fn(lambda p, x: jlstm.lstm(p, x)[0], p, x)
        grad = compile_fn(
            jax.grad(lambda p, x, c: jnp.sum(jlstm.lstm(p, x)[0] * c), (0, 1)), p, x, cot
        )
        comp = time.perf_counter() - t0
        err = max(rel_err(fwd(p, x), want_y), rel_err(grad(p, x, cot)[1], want_g["x"]))
        n = max(1, int(0.3 / cpu_time(partial(fwd, p, x), 1)))
        tf = cpu_time(partial(fwd, p, x), n)
        tt = cpu_time(partial(grad, p, x, cot), max(1, n // 4))
        out.append(
            f"{name}: fwd {tf * 1e3:7.2f} ms  train {tt * 1e3:7.2f} ms  (err {err:.0e}, compile {comp:.1f}s)"
        )
    print(f"{os.environ.get('XLA_FLAGS', '') or '(default)':58s} " + " | ".join(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["long"])
