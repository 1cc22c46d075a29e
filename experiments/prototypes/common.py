# ruff: noqa: E741, B023  (B, T, I, H as in the issue; loop closures run within their iteration)
"""Shared helpers for the performance prototypes: weights from torch, round-robin timing.

Times are medians of round-robin samples; both wall time and process CPU time are kept, because on
this shared 2-core machine CPU time of a single-threaded loop is far steadier than wall time.
"""

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

CASES = {  # (B, T, I, H): one unidirectional layer, the kernel every case is made of
    "mnist": (64, 28, 28, 64),
    "medium": (32, 128, 128, 256),
    "long": (16, 1024, 64, 128),
    "wide": (128, 64, 512, 1024),
}


def torch_lstm(B, T, I, H, bidirectional=False, seed=0, cell="lstm"):
    torch.manual_seed(seed)
    m = (torch.nn.LSTM if cell == "lstm" else torch.nn.GRU)(I, H, bidirectional=bidirectional)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, B, I), np.float32)
    D = 2 if bidirectional else 1
    cot = rng.standard_normal((T, B, D * H), np.float32)
    params = {k: jnp.asarray(v.detach().numpy()) for k, v in m.state_dict().items()}
    return m, params, jnp.asarray(x), jnp.asarray(cot)


def torch_reference(m, x, cot):
    xt = torch.from_numpy(np.array(x)).requires_grad_(True)
    out, _ = m(xt)
    out.backward(torch.from_numpy(np.array(cot)))
    g = {k: p.grad.numpy() for k, p in m.named_parameters()}
    return out.detach().numpy(), g | {"x": xt.grad.numpy()}


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def compile_fn(fn, *args):
    return jax.jit(fn).lower(*args).compile()


def round_robin(fns: dict, samples=7, sample_s=0.25):
    """fns: name -> zero-arg callable. Returns name -> (median wall s, median CPU s) per call."""
    iters = {}
    for name, f in fns.items():
        jax.block_until_ready(f())
        t = time.perf_counter()
        jax.block_until_ready(f())
        iters[name] = max(1, round(sample_s / (time.perf_counter() - t)))
    wall, cpu = {n: [] for n in fns}, {n: [] for n in fns}
    names = list(fns)
    for s in range(samples):
        for n in names[s % len(names) :] + names[: s % len(names)]:
            t, c = time.perf_counter(), time.process_time()
            for _ in range(iters[n]):
                r = fns[n]()
            jax.block_until_ready(r)
            wall[n].append((time.perf_counter() - t) / iters[n])
            cpu[n].append((time.process_time() - c) / iters[n])
    return {n: (statistics.median(wall[n]), statistics.median(cpu[n])) for n in fns}


def report(title, med, base, per=None):
    """Prints wall and CPU ms (and µs per `per` steps) with ratios to `base`."""
    print(title, flush=True)
    bw, bc = med[base]
    for n, (w, c) in med.items():
        extra = f"  {c / per * 1e6:7.2f} µs/step (CPU)" if per else ""
        print(
            f"  {n:34s} wall {w * 1e3:9.3f} ms x{w / bw:5.2f}   CPU {c * 1e3:9.3f} ms x{c / bc:5.2f}{extra}"
        )
