"""Backs BENCHMARKS.md's breakdown of the wide train step: ``python -m experiments.perf.train_parts
wide``. Where a case's train step (``impl="auto"``) spends its time, each part jitted on its own and
timed round-robin in one process:

- ``forward``: the layer without gradients (the C++ loop that saves nothing, on CPU),
- ``forward, saving``: ``jax.vjp`` of the layer: the forward that saves what the backward needs,
- ``backward``: the saved ``vjp`` applied to the output cotangent (the backward loop and XLA's
  whole-sequence GEMMs),
- ``train step``: both in one program (gradients for the weights and the input),

and, for a one-layer one-direction case whose backward hands its gate gradients to XLA (wide),
XLA's three whole-sequence GEMMs of the backward next to ``torch.mm`` (2 threads) on the same
shapes: ``dW_ih = dG^T x``, ``dW_hh = dG^T h_prev``, ``dx = dG W_ih`` with ``dG`` the ``(L*N, 4H)``
gate gradients, in the form the native backward takes on this CPU (``transpose_first``). Torch is
optional (skipped when it is not installed).
"""

import sys

import jax
import numpy as np

from experiments.bench.cases import CASES
from experiments.perf.common import layer_and_init, problem, report, round_robin
from jlstm import loops, native


def parts(name: str) -> dict:
    case = CASES[name]
    layer, _ = layer_and_init(case)
    params, x, cot = problem(case)

    def f(p, x):
        return layer(p, x)[0]

    forward = jax.jit(f)
    saving = jax.jit(lambda p, x: jax.vjp(f, p, x))
    _, vjp = saving(params, x)
    backward = jax.jit(lambda vjp, cot: vjp(cot))
    step = jax.jit(lambda p, x: jax.vjp(f, p, x)[1](cot))
    return {
        "forward": lambda: forward(params, x),
        "forward, saving": lambda: saving(params, x)[0],
        "backward": lambda: backward(vjp, cot),
        "train step": lambda: step(params, x),
    }


def gemms(name: str) -> None:
    case = CASES[name]
    rows, gates = case.seq_len * case.batch, 4 * case.hidden_size
    key = jax.random.key(0)
    dg = jax.random.normal(key, (rows, gates))
    x = jax.random.normal(jax.random.fold_in(key, 1), (rows, case.input_size))
    h = jax.random.normal(jax.random.fold_in(key, 2), (rows, case.hidden_size))
    w_ih = jax.random.normal(jax.random.fold_in(key, 3), (gates, case.input_size))
    # The form the native backward takes on this CPU (jlstm.native.TRANSPOSE_FIRST).
    first = native.TRANSPOSE_FIRST
    weight_grad = jax.jit(lambda d, v: loops.weight_grad(d[None], v[None], first))
    dx = jax.jit(lambda d, w: d @ w)
    shapes = {
        "dW_ih": (weight_grad, (dg, x), 2 * rows * gates * case.input_size),
        "dW_hh": (weight_grad, (dg, h), 2 * rows * gates * case.hidden_size),
        "dx": (dx, (dg, w_ih), 2 * rows * gates * case.input_size),
    }
    fns = {f"xla {k}": (lambda f=f, a=a: f(*a)) for k, (f, a, _) in shapes.items()}
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        torch.set_num_threads(2)
        t = {
            k: torch.from_numpy(np.array(v))
            for k, v in {"dg": dg, "x": x, "h": h, "w": w_ih}.items()
        }
        torch_args = {
            "dW_ih": (t["dg"].T, t["x"]),
            "dW_hh": (t["dg"].T, t["h"]),
            "dx": (t["dg"], t["w"]),
        }
        for k, (a, b) in torch_args.items():
            fns[f"torch {k}"] = lambda a=a, b=b: torch.mm(a, b)  # synchronous on the CPU
    med = round_robin(fns, samples=7)
    print(f"{name}: the backward's whole-sequence GEMMs (transpose_first={first})", flush=True)
    for k, (_, _, flops) in shapes.items():
        line = f"  {k:6s} xla {med[f'xla {k}'][0] * 1e3:8.1f} ms {flops / med[f'xla {k}'][0] / 1e9:5.0f} GFLOP/s"
        if torch is not None:
            s = med[f"torch {k}"][0]
            line += f"   torch.mm {s * 1e3:8.1f} ms {flops / s / 1e9:5.0f} GFLOP/s"
        print(line, flush=True)


def main(name: str) -> None:
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
    report(f"{name}: the train step's parts", round_robin(parts(name), samples=7), "train step")
    case = CASES[name]
    if case.cell == "lstm" and case.num_layers == 1 and not case.bidirectional:
        gemms(name)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "wide")
