"""Runs one benchmark case's jitted jlstm step in a loop, for a sampling profiler to attach to:

    perf record -F 999 -g -o /tmp/wide.data -- \\
        .venv/bin/python -m experiments.prototypes.profile_case wide train 20
    perf report -i /tmp/wide.data --no-children --sort symbol --percent-limit 1 --stdio

``impl`` (fourth argument, default ``auto``) picks the path; the step is compiled and run once
before the timed loop, whose wall time per step is printed with the case's GEMM throughput.
"""

import sys
import time

import jax
import jax.numpy as jnp

import jlstm
from experiments.bench import CASES


def flops(case, mode: str) -> float:
    """Multiply-adds x 2 of the gate GEMMs (x @ W_ih.T and h @ W_hh.T over every step, layer and
    direction); a train step adds twice that again for dx, dh and the weight gradients."""
    gates = 4 if case.cell == "lstm" else 3
    directions = 2 if case.bidirectional else 1
    total = 0.0
    for layer in range(case.num_layers):
        inp = case.input_size if layer == 0 else directions * case.hidden_size
        per_step = 2 * case.batch * gates * case.hidden_size * (inp + case.hidden_size)
        total += directions * case.seq_len * per_step
    return total * (3 if mode == "train" else 1)


def main(name: str, mode: str, steps: int, impl: str = "auto") -> None:
    case = CASES[name]
    init, layer = {"lstm": (jlstm.init_lstm, jlstm.lstm), "gru": (jlstm.init_gru, jlstm.gru)}[
        case.cell
    ]
    keys = jax.random.split(jax.random.key(0), 2)
    params = init(
        keys[0],
        case.input_size,
        case.hidden_size,
        num_layers=case.num_layers,
        bidirectional=case.bidirectional,
    )
    x = jax.random.normal(keys[1], (case.seq_len, case.batch, case.input_size), jnp.float32)

    def loss(p, x):
        return jnp.sum(layer(p, x, impl=impl)[0])

    step = jax.jit(jax.grad(loss, argnums=(0, 1)) if mode == "train" else loss)
    jax.block_until_ready(step(params, x))
    start = time.perf_counter()
    for _ in range(steps):
        jax.block_until_ready(step(params, x))
    seconds = (time.perf_counter() - start) / steps
    rate = flops(case, mode) / seconds / 1e9
    print(f"{name} {mode} impl={impl}: {seconds * 1e3:.1f} ms per step, {rate:.0f} GFLOP/s")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), *sys.argv[4:])
