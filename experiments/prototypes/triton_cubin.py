"""Compiles jlstm.pallas' kernels to H100 machine code (sm_90 cubin) on a machine without a GPU and
reports what each needs per thread: registers, spill stack, shared memory.

The test suite checks that the kernels lower to Triton IR (``jlstm.pallas.lowered_for_cuda``); this
goes on through Triton's own compiler (TTIR -> TTGIR -> LLVM -> PTX -> ptxas), which is where tile
shapes that do not fit a GPU show up. Triton is not a jlstm dependency, so it runs in two steps and
two environments:

    .venv/bin/python -m experiments.prototypes.triton_cubin dump /tmp/ttir
    python3 -m venv /tmp/tv && /tmp/tv/bin/pip install triton==3.9.0
    PATH=$PATH:$(echo /tmp/tv/lib/python3*/site-packages/triton/backends/nvidia/bin) \\
        /tmp/tv/bin/python experiments/prototypes/triton_cubin.py compile /tmp/ttir

``dump`` writes the Triton IR of the forward (saving the gates) and backward kernels of a packed
training step, LSTM and GRU, H = 64 and 128, float32; ``compile`` builds each for sm_90 with the
``num_warps`` jlstm uses and prints ``cuobjdump --dump-resource-usage``.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys


def dump(directory: str) -> None:
    import jax
    import jax.numpy as jnp
    from jax._src.pallas.triton import lowering

    import jlstm
    from jlstm import pallas

    modules = []
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
            pallas.lowered_for_cuda(jax.grad(loss, argnums=(0, 1)), params, x)
            for name, text in zip(("fwd", "bwd"), modules[start:], strict=True):
                with open(os.path.join(directory, f"{kind}_H{hidden}_{name}.ttir"), "w") as f:
                    f.write(text)
    print(f"{len(modules)} kernels in {directory}; num_warps {pallas._compiler_params().num_warps}")


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
