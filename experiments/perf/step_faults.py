"""What one jitted step of a benchmark case costs the operating system: ``python -m
experiments.perf.step_faults wide train 5``. For each of ``steps`` calls after a warm-up call,
prints the wall time, the process's user and system CPU time and its minor page faults (getrusage).
A fourth argument ``torch`` runs torch's step of the same case (``nn.LSTM``/``nn.GRU``, 2 threads,
as ``make bench`` does) before each measured jlstm step, as the benchmark's round-robin does:
``python -m experiments.perf.step_faults wide train 5 torch``.

XLA allocates a program's temporaries afresh on every run, so the first write to each of their
pages is a page fault in which the kernel zeroes the page; the system time and the fault count say
how much of a step that costs, next to the wall time.
"""

import resource
import sys
import time

import jax
import jax.numpy as jnp

from experiments.bench.cases import CASES
from experiments.perf.common import layer_and_init, problem, train_step


def torch_step(case, mode):
    """torch's step of the case, as experiments.bench times it (needs torch)."""
    import torch

    from experiments.bench import adapters

    torch.set_num_threads(2)
    module, x, cot = adapters.setup(case, "cpu")
    impl = adapters.make_torch(module, x, cot, mode, "cpu")
    return impl.run


def main(name: str, mode: str, steps: int, between: str = "") -> None:
    case = CASES[name]
    if between not in ("", "torch"):
        raise SystemExit(f"step_faults: the fourth argument is 'torch' or nothing, got {between!r}")
    before_each = torch_step(case, mode) if between == "torch" else (lambda: None)
    params, x, cot = problem(case)
    if mode == "train":
        step = train_step(case, cot)
    else:
        layer, _ = layer_and_init(case)
        step = jax.jit(lambda p, x: jnp.sum(layer(p, x)[0] * cot))
    jax.block_until_ready(step(params, x))
    for _ in range(steps):
        before_each()
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        jax.block_until_ready(step(params, x))
        wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
        user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
        faults = after.ru_minflt - before.ru_minflt
        print(
            f"{name} {mode}{' after torch' if between else ''}: wall {wall * 1e3:.0f} ms, user {user * 1e3:.0f} ms, "
            f"system {system * 1e3:.0f} ms, {faults} minor page faults",
            flush=True,
        )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 5, *sys.argv[4:5])
