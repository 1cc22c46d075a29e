# ruff: noqa: E741, B023  (B, T, I, H as in the issue; loop closures run within their iteration)
"""Bidirectional layer: do XLA's two direction loops run on both cores, and does one scan over both
directions (batched matmuls) pay?

    python -m experiments.prototypes.bidir medium           # 2 cores: wall time is what counts
    taskset -c 1 python -m experiments.prototypes.bidir medium
"""

import sys
from functools import partial

import jax.numpy as jnp
import numpy as np
import torch
from jax import lax

import jlstm
from experiments.prototypes.common import (
    CASES,
    compile_fn,
    rel_err,
    report,
    round_robin,
    torch_lstm,
)


def one_scan_bidir(p, x):
    """Both directions in one lax.scan: weights stacked on a leading direction axis."""
    H = p["weight_hh_l0"].shape[1]
    w_ih_t = jnp.stack([p["weight_ih_l0"].T, p["weight_ih_l0_reverse"].T])  # (2, I, 4H)
    w_hh_t = jnp.stack([p["weight_hh_l0"].T, p["weight_hh_l0_reverse"].T])  # (2, H, 4H)
    b = jnp.stack(
        [p["bias_ih_l0"] + p["bias_hh_l0"], p["bias_ih_l0_reverse"] + p["bias_hh_l0_reverse"]]
    )
    half, one, zero = (jnp.full((H,), v) for v in (0.5, 1.0, 0.0))
    scale = jnp.concatenate([half, half, one, half])
    offset = jnp.concatenate([half, half, zero, half])
    xs = jnp.stack([x, x[::-1]], axis=1)  # (T, 2, N, I)

    def step(carry, x_t):
        h, c = carry  # (2, N, H)
        pre = jnp.einsum("dni,dig->dng", x_t, w_ih_t) + jnp.einsum("dnh,dhg->dng", h, w_hh_t)
        acts = jnp.tanh((pre + b[:, None]) * scale) * scale + offset
        i, f, g, o = jnp.split(acts, 4, axis=-1)
        c = f * c + i * g
        h = o * jnp.tanh(c)
        return (h, c), h

    z = jnp.zeros((2, x.shape[1], H), x.dtype)
    (h, c), ys = lax.scan(step, (z, z), xs)
    return jnp.concatenate([ys[:, 0], ys[::-1, 1]], axis=-1), (h, c)


def main(names):
    torch.set_num_threads(2)
    for name in names:
        B, T, I, H = CASES[name]
        m, p, x, cot = torch_lstm(B, T, I, H, bidirectional=True)
        mu, pu, _, _ = torch_lstm(B, T, I, H)
        with torch.inference_mode():
            want = m(torch.from_numpy(np.array(x)))[0].numpy()
        fns = {}
        for n, f, pp in [
            ("core bi", lambda p, x: jlstm.lstm(p, x), p),
            ("core uni", lambda p, x: jlstm.lstm(p, x), pu),
            ("one scan, both directions", one_scan_bidir, p),
        ]:
            c = compile_fn(f, pp, x)
            if pp is p:
                assert rel_err(c(pp, x)[0], want) < 1e-4, n
            fns[n] = partial(c, pp, x)
        xt = torch.from_numpy(np.array(x))

        def torch_bi():
            with torch.inference_mode():
                m(xt)

        fns["torch bi (2 threads)"] = torch_bi
        report(
            f"{name} fwd, bidirectional (B,T,I,H)={B, T, I, H}", round_robin(fns), "core bi", per=T
        )


if __name__ == "__main__":
    main(sys.argv[1:] or ["medium", "long"])
