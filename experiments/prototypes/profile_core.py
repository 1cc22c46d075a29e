# ruff: noqa: E741, B023  (B, T, I, H as in the issue; loop closures run within their iteration)
"""Per-op profile (jax.profiler) of jlstm's train step on one layer.

python -m experiments.prototypes.profile_core long [fast]
"""

import sys

import jax
import jax.numpy as jnp

import jlstm
from experiments.prototypes import lstm_fast
from experiments.prototypes.common import CASES, compile_fn, torch_lstm
from experiments.prototypes.xprof import op_table


def main(name, which="core", mode="train"):
    B, T, I, H = CASES[name]
    m, p, x, cot = torch_lstm(B, T, I, H)
    f = (lambda p, x: jlstm.lstm(p, x)) if which == "core" else lstm_fast.lstm

    def loss(p, x, cot):
        return jnp.sum(f(p, x)[0] * cot)

    if mode == "train":
        args = (p, x, cot)
        c = compile_fn(jax.grad(loss, (0, 1)), *args)
    else:
        args = (p, x)
        c = compile_fn(f, *args)
    print(f"{which} {mode} {name} (B,T,I,H)={B, T, I, H}")
    op_table(c, args, steps=T, top=30)


if __name__ == "__main__":
    main(*sys.argv[1:])
