# ruff: noqa: E741, B023  (B, T, I, H as in the issue; loop closures run within their iteration)
"""lstm_fast variants vs jlstm's core, fwd and train, checked against torch first.

python -m experiments.prototypes.fast_vs_core long medium mnist wide
"""

import sys
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import torch

import jlstm
from experiments.prototypes import lstm_fast, lstm_fast2
from experiments.prototypes.common import (
    CASES,
    compile_fn,
    rel_err,
    report,
    round_robin,
    torch_lstm,
    torch_reference,
)

VARIANTS = {
    "core": lambda p, x: jlstm.lstm(p, x),
    "W^T (fast)": partial(lstm_fast.lstm, wt=True, concat=False, dw="einsum"),
    "fast2 rows=256": partial(lstm_fast2.lstm, rows=256),
    "fast2 rows=512": partial(lstm_fast2.lstm, rows=512),
    "fast2 rows=1024": partial(lstm_fast2.lstm, rows=1024),
}


def main(names, modes=("fwd", "train"), threads=1):
    torch.set_num_threads(threads)
    for name in names:
        B, T, I, H = CASES[name]
        m, p, x, cot = torch_lstm(B, T, I, H)
        want_y, want_g = torch_reference(m, x, cot)
        xt = torch.from_numpy(np.array(x)).requires_grad_(True)
        ct = torch.from_numpy(np.array(cot))
        for mode in modes:
            fns = {}
            for n, f in VARIANTS.items():
                if mode == "fwd":
                    c = compile_fn(f, p, x)
                    err = rel_err(c(p, x)[0], want_y)
                    fns[n] = partial(c, p, x)
                else:

                    def loss(p, x, cot, f=f):
                        return jnp.sum(f(p, x)[0] * cot)

                    c = compile_fn(jax.grad(loss, (0, 1)), p, x, cot)
                    gp, gx = c(p, x, cot)
                    err = max(rel_err(gp[k], want_g[k]) for k in gp)
                    err = max(err, rel_err(gx, want_g["x"]))
                    fns[n] = partial(c, p, x, cot)
                assert err < 1e-4, (name, mode, n, err)

            if mode == "fwd":

                def run_torch():
                    with torch.inference_mode():
                        m(xt)
            else:

                def run_torch():
                    m.zero_grad(set_to_none=True)
                    xt.grad = None
                    m(xt)[0].backward(ct)

            fns[f"torch {threads}t"] = run_torch
            report(f"{name} {mode} (B,T,I,H)={B, T, I, H}", round_robin(fns), "core", per=T)


if __name__ == "__main__":
    args = sys.argv[1:] or ["long", "medium", "mnist"]
    modes = [a for a in args if a in ("fwd", "train")] or ["fwd", "train"]
    threads = 2 if "t2" in args else 1  # t2: torch with 2 threads (run without taskset)
    main([a for a in args if a in CASES], modes, threads)
