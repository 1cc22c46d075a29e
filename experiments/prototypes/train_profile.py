# ruff: noqa: E741, B023  (B, T, I, H as in the issue; loop closures run within their iteration)
"""Where the time of one LSTM layer's training step goes: forward (saving residuals) vs backward.

python -m experiments.prototypes.train_profile long medium mnist
"""

import sys
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import torch

import jlstm
from experiments.bench import CASES as BENCH_CASES
from experiments.bench import FlaxStack, to_flax
from experiments.prototypes.common import CASES, compile_fn, report, round_robin, torch_lstm


def main(names):
    torch.set_num_threads(1)
    for name in names:
        B, T, I, H = CASES[name]
        m, p, x, cot = torch_lstm(B, T, I, H)

        def out(p, x):
            return jlstm.lstm(p, x)[0]

        def loss(p, x, cot):
            return jnp.sum(out(p, x) * cot)

        def fwd_res(p, x):  # forward that saves residuals (what the train step's forward does)
            y, vjp = jax.vjp(out, p, x)
            return y, vjp

        y, vjp = jax.jit(fwd_res)(p, x)
        fns = {
            "jlstm fwd only": partial(compile_fn(out, p, x), p, x),
            "jlstm fwd+residuals": partial(compile_fn(lambda p, x: fwd_res(p, x)[0], p, x), p, x),
            "jlstm bwd only": partial(compile_fn(lambda v, c: v(c), vjp, cot), vjp, cot),
            "jlstm train": partial(compile_fn(jax.grad(loss, (0, 1)), p, x, cot), p, x, cot),
        }
        case = BENCH_CASES["mnist"]._replace(batch=B, seq_len=T, input_size=I, hidden_size=H)
        fp = to_flax(p, case)
        model = FlaxStack("lstm", H, 1, False)
        floss = jax.grad(lambda fp, x, cot: jnp.sum(model.apply(fp, x) * cot), (0, 1))
        fns["flax train"] = partial(compile_fn(floss, fp, x, cot), fp, x, cot)
        xt = torch.from_numpy(np.array(x)).requires_grad_(True)
        ct = torch.from_numpy(np.array(cot))

        def torch_train():
            m.zero_grad(set_to_none=True)
            xt.grad = None
            m(xt)[0].backward(ct)

        fns["torch 1t train"] = torch_train
        report(f"{name} train (B,T,I,H)={B, T, I, H}", round_robin(fns), "jlstm train", per=T)


if __name__ == "__main__":
    main(sys.argv[1:] or ["long", "medium", "mnist"])
