# ruff: noqa: E741  (B, T, I, H as in the issue)
"""Can two virtual CPU devices (one per core) beat XLA's single-threaded loop body? The batch is
split over the devices with shard_map (weights replicated, gradients psum'd) and one jlstm call
runs per device.

    python -m experiments.prototypes.cpu_devices 16,1024,64,128 1
    python -m experiments.prototypes.cpu_devices 16,1024,64,128 2

Prints median wall and CPU (process) time per call, forward and train (grads w.r.t. params and x).
"""

import sys
import time

import jax

jax.config.update("jax_num_cpu_devices", int(sys.argv[2]) if len(sys.argv) > 2 else 2)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jlstm  # noqa: E402


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


def main():
    B, T, I, H = (int(v) for v in sys.argv[1].split(","))
    key = jax.random.key(0)
    params = jlstm.init_lstm(key, I, H)
    x = jax.random.normal(key, (T, B, I))
    cot = jax.random.normal(jax.random.key(1), (T, B, H))
    mesh = Mesh(np.array(jax.devices()), ("b",))
    batch = P(None, "b")

    def forward(p, x):
        return jlstm.lstm(p, x)[0]

    def grads(p, x, c):
        gp, gx = jax.grad(lambda p, x: jnp.sum(forward(p, x) * c), (0, 1))(p, x)
        return gp, gx  # gp is already summed over the shards (replicated params)

    fwd = jax.jit(jax.shard_map(forward, mesh=mesh, in_specs=(P(), batch), out_specs=batch))
    train = jax.jit(
        jax.shard_map(grads, mesh=mesh, in_specs=(P(), batch, batch), out_specs=(P(), batch))
    )
    print(
        f"{len(jax.devices())} CPU device(s), (B,T,I,H)={B, T, I, H}: "
        f"fwd wall/cpu ms {wall_and_cpu(lambda: fwd(params, x), 20)}, "
        f"train wall/cpu ms {wall_and_cpu(lambda: train(params, x, cot), 5)}"
    )


if __name__ == "__main__":
    main()
