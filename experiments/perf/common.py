"""What the perf scripts share: a case's random problem through jlstm's public API, round-robin
timing (experiments.bench's) of plain callables with wall and process CPU time side by side, and
settings compared each in a process of its own.

CPU time is kept because on a shared machine the CPU time of a loop is far steadier than its wall
time, and CPU time / wall time says how many cores a call kept busy.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jlstm
from experiments.bench.cases import Case, num_directions
from experiments.bench.timing import Timed, max_rel_err, time_round_robin


def layer_and_init(case: Case):
    """``(jlstm.lstm, jlstm.init_lstm)`` or the GRU's, for a case's cell."""
    return {"lstm": (jlstm.lstm, jlstm.init_lstm), "gru": (jlstm.gru, jlstm.init_gru)}[case.cell]


def problem(case: Case, seed: int = 0):
    """``(params, x, cot)``: jlstm's initial weights for the case, a time-major input and an output
    cotangent (the weights of ``sum(output * cot)``, the loss every train step differentiates)."""
    _, init = layer_and_init(case)
    keys = jax.random.split(jax.random.key(seed), 3)
    params = init(
        keys[0],
        case.input_size,
        case.hidden_size,
        num_layers=case.num_layers,
        bidirectional=case.bidirectional,
    )
    x = jax.random.normal(keys[1], (case.seq_len, case.batch, case.input_size))
    cot = jax.random.normal(
        keys[2], (case.seq_len, case.batch, num_directions(case) * case.hidden_size)
    )
    return params, x, cot


def round_robin(fns: dict, samples: int = 7, sample_s: float = 0.25) -> dict:
    """``fns``: name -> zero-argument callable returning JAX arrays. Returns name -> (median wall
    seconds, median process CPU seconds) per call, sampled round-robin."""
    impls = {name: Timed(f, jax.block_until_ready) for name, f in fns.items()}
    timings = time_round_robin(impls, samples, sample_s)
    return {name: (t["median_s"], t["cpu_median_s"]) for name, t in timings.items()}


def report(title: str, med: dict, base: str, per: int | None = None) -> None:
    """Prints wall and CPU ms (and µs per ``per`` steps) of each entry, with ratios to ``base``."""
    print(title, flush=True)
    bw, bc = med[base]
    for n, (w, c) in med.items():
        extra = f"  {c / per * 1e6:7.2f} µs/step (CPU)" if per else ""
        print(
            f"  {n:34s} wall {w * 1e3:9.3f} ms x{w / bw:5.2f}   CPU {c * 1e3:9.3f} ms x{c / bc:5.2f}{extra}"
        )


def train_step(case: Case, cot, impl: str = "auto"):
    """The case's jitted train step, called as ``step(params, x)``: the gradients of ``sum(output *
    cot)`` for the weights and the input (``problem``'s ``cot``)."""
    layer, _ = layer_and_init(case)
    loss = lambda p, x: jnp.sum(layer(p, x, impl=impl)[0] * cot)  # noqa: E731
    return jax.jit(jax.grad(loss, argnums=(0, 1)))


def checked_train_ms(case: Case, steps: int = 21) -> float:
    """Median wall milliseconds of ``steps`` calls of the case's jitted train step (gradients of
    ``sum(output * cot)`` for the weights and the input) on jlstm's C++ loop, after checking its
    gradients against ``impl="scan"`` to 1e-4 of each gradient's largest entry (as
    experiments.bench); a mismatch exits with the error."""
    params, x, cot = problem(case)
    fast, reference = train_step(case, cot, "native"), train_step(case, cot, "scan")
    got, want = (dict(enumerate(jax.tree.leaves(f(params, x)))) for f in (fast, reference))
    err = max_rel_err(got, {k: np.asarray(v) for k, v in want.items()})
    if err > 1e-4:
        raise SystemExit(f"{case}: gradients differ from impl='scan' by {err:.1e}")
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(fast(params, x))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def alternate(module: str, settings: dict[str, tuple[list[str], dict]], rounds: int) -> dict:
    """Runs ``python -m module --child ARGS`` once per setting (name -> (ARGS, extra environment))
    per round, the settings alternating, each in a process of its own: in one process the
    programs' buffers come and go between each other's calls, which changes what the memory
    allocator hands back to the system and so the very cost being compared. Each child prints its
    figure last. Returns name -> the figures of the rounds."""
    figures = {name: [] for name in settings}
    for _ in range(rounds):
        for name, (args, env) in settings.items():
            cmd = [sys.executable, "-m", module, "--child", *args]
            done = subprocess.run(
                cmd, capture_output=True, text=True, check=True, env=os.environ | env
            )
            figures[name].append(float(done.stdout.split()[-1]))
    return figures


def alternate_calls(runs: dict, rounds: int) -> dict:
    """``runs``: name -> zero-argument callable that waits for its result. Calls each once per
    round, the order reversing from round to round, so that a machine whose speed drifts treats
    all alike; returns name -> median milliseconds per call."""
    times = {k: [] for k in runs}
    for r in range(rounds):
        for k in list(runs) if r % 2 == 0 else list(runs)[::-1]:
            start = time.perf_counter()
            runs[k]()
            times[k].append(time.perf_counter() - start)
    return {k: statistics.median(t) * 1e3 for k, t in times.items()}
