"""Backs ``jlstm.native.WEIGHTS_IN_LOOP_MIN_BATCH`` and BENCHMARKS.md's batch-1 backward figures:
``python -m experiments.perf.backward_batch 1,2,3 64,256``. For each batch size and hidden size
(an LSTM, T=128, I=64, one layer), the C++ loop's train step compiled both ways its backward can
end:

- ``in loop``: the backward loop sums the weight gradients itself at every step,
- ``gates out``: it hands every step's gate gradients to XLA's whole-sequence GEMMs.

Each setting runs in a process of its own, the two alternating for ``rounds`` rounds (default 3):
in one process the two programs' buffers come and go between each other's calls, which changes
what the memory allocator hands back to the system and so the very cost being compared. A process
sets ``jlstm.native``'s public limits (``WEIGHTS_IN_LOOP_MIN_BATCH``, ``WEIGHTS_IN_LOOP_BYTES``),
checks the gradients against ``impl="scan"``, and prints the median wall time of 21 steps.
"""

import statistics
import subprocess
import sys

SETTINGS = ("in loop", "gates out")


def child(batch: int, hidden: int, setting: str) -> None:
    import time

    import jax
    import jax.numpy as jnp

    from experiments.bench.cases import Case
    from experiments.perf.common import layer_and_init, problem
    from jlstm import native

    native.WEIGHTS_IN_LOOP_MIN_BATCH = 1
    if setting == "gates out":
        native.WEIGHTS_IN_LOOP_BYTES = 0
    case = Case("lstm", batch, 128, 64, hidden, 1, False)
    layer, _ = layer_and_init(case)
    params, x, cot = problem(case)

    def step(impl):
        loss = lambda p, x: jnp.sum(layer(p, x, impl=impl)[0] * cot)  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=(0, 1)))

    fast, reference = step("native"), step("scan")
    got, want = jax.tree.leaves(fast(params, x)), jax.tree.leaves(reference(params, x))
    err = max(
        float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) for a, b in zip(got, want, strict=True)
    )
    if err > 1e-4:  # relative to each gradient's largest entry, as experiments.bench
        raise SystemExit(f"{case} {setting}: gradients differ from impl='scan' by {err:.1e}")
    times = []
    for _ in range(21):
        start = time.perf_counter()
        jax.block_until_ready(fast(params, x))
        times.append(time.perf_counter() - start)
    print(f"{statistics.median(times) * 1e3:.3f}")


def main(batches: list[int], hiddens: list[int], rounds: int) -> None:
    for hidden in hiddens:
        for batch in batches:
            ms = {s: [] for s in SETTINGS}
            for _ in range(rounds):
                for setting in SETTINGS:
                    cmd = [sys.executable, "-m", "experiments.perf.backward_batch", "--child"]
                    cmd += [str(batch), str(hidden), setting]
                    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
                    ms[setting].append(float(done.stdout.split()[-1]))
            ratios = [out / loop for loop, out in zip(*ms.values(), strict=True)]
            print(
                f"batch {batch} hidden {hidden}: in loop "
                + " ".join(f"{t:.2f}" for t in ms["in loop"])
                + " ms, gates out "
                + " ".join(f"{t:.2f}" for t in ms["gates out"])
                + " ms; gates out / in loop "
                + " ".join(f"{r:.2f}" for r in ratios),
                flush=True,
            )


if __name__ == "__main__":
    if sys.argv[1] == "--child":
        child(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    else:
        rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
        main(
            [int(b) for b in sys.argv[1].split(",")],
            [int(h) for h in sys.argv[2].split(",")],
            rounds,
        )
