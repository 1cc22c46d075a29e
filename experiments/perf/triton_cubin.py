"""Backs README's and BENCHMARKS.md's sm_90 resource table of the Pallas kernels (registers, spill
stack, shared memory): ``python -m experiments.perf.triton_cubin dump /tmp/ttir``, then ``compile``
(commands below). Compiles jlstm.pallas' kernels to H100 machine code (sm_90 cubin) on a machine
without a GPU and reports what each needs per thread.

The test suite checks that the kernels lower to Triton IR (``jlstm.pallas.lowered_for_cuda``); this
goes on through Triton's own compiler (TTIR -> TTGIR -> LLVM -> PTX -> ptxas), which is where tile
shapes that do not fit a GPU show up. Triton is not a jlstm dependency, so it runs in two steps and
two environments:

    .venv/bin/python -m experiments.perf.triton_cubin dump /tmp/ttir
    python3 -m venv /tmp/tv && /tmp/tv/bin/pip install triton==3.9.0
    PATH=$PATH:$(echo /tmp/tv/lib/python3*/site-packages/triton/backends/nvidia/bin) \\
        /tmp/tv/bin/python experiments/perf/triton_cubin.py compile /tmp/ttir

``dump`` writes the Triton IR of the forward (saving the gates) and backward kernels of a packed
training step, LSTM and GRU, H = 64, 128 and 256, float32, and prints the ``num_warps`` jlstm asks
for; ``compile`` builds each for sm_90 with that many warps (NUM_WARPS, default 8) and prints
``cuobjdump --dump-resource-usage``. ``dump`` captures each kernel's Triton IR by wrapping JAX's
Pallas-to-Triton lowering (a JAX internal: the lowered StableHLO holds the IR only as bytecode,
which Triton's compiler does not read).
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys


def dump(directory: str) -> None:
    import jax
    import jax.numpy as jnp
    from jax._src.pallas.triton import lowering

    import jlstm
    from jlstm.pallas import lowered_for_cuda  # the one use of jlstm beyond its public API

    modules, warps = [], set()
    lower = lowering.lower_jaxpr_to_triton_module

    def capture(*args, **kwargs):
        result = lower(*args, **kwargs)
        modules.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    lowering.lower_jaxpr_to_triton_module = capture
    os.makedirs(directory, exist_ok=True)
    layers = {"lstm": (jlstm.init_lstm, jlstm.lstm), "gru": (jlstm.init_gru, jlstm.gru)}
    for kind, (init, layer) in layers.items():
        for hidden in (64, 128, 256):
            params = init(jax.random.key(0), 32, hidden)
            x = jnp.zeros((10, 64, 32), jnp.float32)
            lengths = jnp.full((64,), 10)

            def loss(p, x, layer=layer, lengths=lengths):
                return jnp.sum(layer(p, x, seq_lengths=lengths, impl="pallas")[0])

            start = len(modules)
            text = lowered_for_cuda(jax.grad(loss, argnums=(0, 1)), params, x)
            warps |= set(re.findall(r"num_warps = (\d+) : i32", text))
            for name, ir in zip(("fwd", "bwd"), modules[start:], strict=True):
                with open(os.path.join(directory, f"{kind}_H{hidden}_{name}.ttir"), "w") as f:
                    f.write(ir)
    print(f"{len(modules)} kernels in {directory}; num_warps {', '.join(sorted(warps))}")


def compile_all(directory: str, num_warps: int = 8) -> None:
    import triton
    from triton.backends.compiler import GPUTarget

    for path in sorted(glob.glob(os.path.join(directory, "*.ttir"))):
        kernel = triton.compile(
            path,
            target=GPUTarget("cuda", 90, 32),
            options={"num_warps": num_warps, "num_stages": 1},
        )
        cubin = path.removesuffix(".ttir") + ".cubin"
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        usage = subprocess.run(
            ["cuobjdump", "--dump-resource-usage", cubin], capture_output=True, text=True
        ).stdout
        line = next((ln.strip() for ln in usage.splitlines() if "REG:" in ln), "?")
        name = os.path.basename(path)
        print(f"{name}: dynamic shared {kernel.metadata.shared} B; {line}")


if __name__ == "__main__":
    step, directory = sys.argv[1], sys.argv[2]
    if step == "dump":
        dump(directory)
    else:
        compile_all(directory, int(os.environ.get("NUM_WARPS", 8)))
