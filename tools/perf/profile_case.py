"""One benchmark case's jitted jlstm step in a loop, timed, for a sampling profiler to attach to:
``python -m tools.perf.profile_case CASE MODE STEPS [IMPL]``, e.g.

    perf record -F 999 -g -o /tmp/wide.data -- \\
        .venv/bin/python -m tools.perf.profile_case wide train 20
    perf report -i /tmp/wide.data --no-children --sort symbol --percent-limit 1 --stdio

Modes: ``fwd``, ``train`` (gradients for the weights and the input, as ``make bench``) and
``train-weights`` (for the weights only: the input is data, as in a training program). ``impl``
(fourth argument, default ``auto``) picks the path; the step is compiled and run once before the
timed loop, whose wall time per step is printed, with the case's GEMM throughput for ``fwd`` and
``train``. Only jlstm and JAX run in this process (no torch), so the profile holds nothing else.
"""

import sys
import time

import jax
import jax.numpy as jnp

import jlstm
from experiments.bench.cases import CASES, Case, flops, num_directions


def layer_and_init(case: Case):
    """``(jlstm.lstm, jlstm.init_lstm)`` or the GRU's, for a case's cell."""
    return {"lstm": (jlstm.lstm, jlstm.init_lstm), "gru": (jlstm.gru, jlstm.init_gru)}[case.cell]


def problem(case: Case, seed: int = 0):
    """``(params, x, cot)``: jlstm's initial weights for the case, a time-major input and an output
    cotangent (the weights of ``sum(output * cot)``, the loss every train step differentiates)."""
    _, init = layer_and_init(case)
    keys = jax.random.split(jax.random.key(seed), 3)
    sizes = dict(num_layers=case.num_layers, bidirectional=case.bidirectional)
    params = init(keys[0], case.input_size, case.hidden_size, **sizes)
    x = jax.random.normal(keys[1], (case.seq_len, case.batch, case.input_size))
    out = num_directions(case) * case.hidden_size
    return params, x, jax.random.normal(keys[2], (case.seq_len, case.batch, out))


def main(name: str, mode: str, steps: int, impl: str = "auto") -> None:
    case = CASES[name]
    layer, _ = layer_and_init(case)
    params, x, _ = problem(case)

    def loss(p, x):
        return jnp.sum(layer(p, x, impl=impl)[0])

    modes = {"fwd": loss, "train": jax.grad(loss, argnums=(0, 1)), "train-weights": jax.grad(loss)}
    if mode not in modes:
        raise SystemExit(f"unknown mode {mode!r}; choose from {list(modes)}")
    step = jax.jit(modes[mode])
    jax.block_until_ready(step(params, x))
    start = time.perf_counter()
    for _ in range(steps):
        jax.block_until_ready(step(params, x))
    seconds = (time.perf_counter() - start) / steps
    rate = f", {flops(case, mode) / seconds / 1e9:.0f} GFLOP/s" if mode != "train-weights" else ""
    print(f"{name} {mode} impl={impl}: {seconds * 1e3:.2f} ms per step{rate}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), *sys.argv[4:])
