"""Backs BENCHMARKS.md's "two CPU devices, one per core" figures: ``python -m
experiments.perf.cpu_devices long {1,2}``. Can two virtual CPU devices (one per core) beat XLA's
single-threaded loop body? The batch is split over the devices with shard_map (weights replicated,
gradients psum'd) and one jlstm call runs per device:

    python -m experiments.perf.cpu_devices long 1
    python -m experiments.perf.cpu_devices long 2

The first argument is one of experiments.bench's cases (its batch must divide by the device count).
Prints median wall and CPU (process) time per call, forward and train (grads w.r.t. params and x).
"""

import sys
import time

import jax

# Before anything asks JAX for its devices: the count is fixed when the CPU backend starts.
jax.config.update("jax_num_cpu_devices", int(sys.argv[2]) if len(sys.argv) > 2 else 2)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from experiments.bench.cases import CASES  # noqa: E402
from experiments.perf.common import layer_and_init, problem  # noqa: E402


def wall_and_cpu(f, n):
    jax.block_until_ready(f())
    samples = []
    for _ in range(7):
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(n):
            r = f()
        jax.block_until_ready(r)
        samples.append(((time.perf_counter() - wall) / n, (time.process_time() - cpu) / n))
    samples.sort()
    return tuple(round(v * 1e3, 2) for v in samples[len(samples) // 2])


def main(name: str) -> None:
    case = CASES[name]
    layer, _ = layer_and_init(case)
    params, x, cot = problem(case)
    mesh = Mesh(np.array(jax.devices()), ("b",))
    batch = P(None, "b")

    def forward(p, x):
        return layer(p, x)[0]

    def grads(p, x, c):
        gp, gx = jax.grad(lambda p, x: jnp.sum(forward(p, x) * c), (0, 1))(p, x)
        return gp, gx  # gp is already summed over the shards (replicated params)

    fwd = jax.jit(jax.shard_map(forward, mesh=mesh, in_specs=(P(), batch), out_specs=batch))
    train = jax.jit(
        jax.shard_map(grads, mesh=mesh, in_specs=(P(), batch, batch), out_specs=(P(), batch))
    )
    print(
        f"{len(jax.devices())} CPU device(s), {name} {tuple(case)}: "
        f"fwd wall/cpu ms {wall_and_cpu(lambda: fwd(params, x), 20)}, "
        f"train wall/cpu ms {wall_and_cpu(lambda: train(params, x, cot), 5)}"
    )


if __name__ == "__main__":
    main(sys.argv[1])
