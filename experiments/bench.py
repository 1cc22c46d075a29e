"""Benchmark jlstm against torch.nn.LSTM/GRU, flax.linen.RNN and, on GPU, jax.experimental.rnn.

    make bench                                  # every case and mode + the MNIST epoch
    make bench-quick                            # about one minute: small cases, 3 samples
    python -m experiments.bench --cases mnist,long --modes train --samples 5 --no-epoch

Every implementation gets the same weights (torch's ``state_dict``, converted with
``jlstm.from_torch`` and into flax's parameter tree) and must agree with torch, outputs and
gradients, before it is timed. Timing is round-robin in one process: each sample runs every
implementation once for a few iterations, the starting implementation rotating; a case reports the
median over samples of the time per iteration, and ratios to torch measured side by side. JAX
compile time (trace + lower + compile) is measured apart. "fwd" is the forward pass (torch under
``inference_mode``); "train" is forward + backward of ``sum(output * cotangent)``, gradients with
respect to the parameters and the input. Results print as a markdown table and go to
``runs/bench/bench.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import optax
import torch

import jlstm
from jlstm import native, pallas


class Case(NamedTuple):
    cell: str  # "lstm" or "gru"
    batch: int
    seq_len: int
    input_size: int
    hidden_size: int
    num_layers: int
    bidirectional: bool


CASES = {
    "mnist": Case("lstm", 64, 28, 28, 64, 1, False),
    "medium": Case("lstm", 32, 128, 128, 256, 2, True),
    "long": Case("lstm", 16, 1024, 64, 128, 1, False),
    "wide": Case("lstm", 128, 64, 512, 1024, 1, False),
    "gru": Case("gru", 32, 128, 128, 256, 2, True),
}
QUICK_CASES = ["mnist", "long", "gru"]
MODES = ["fwd", "train"]
# jlstm: impl="auto" (on CPU the C++ loop of jlstm.native); jlstm-fused: the pure-JAX lax.scan path
# with the hand-written backward (impl="fused", what auto takes on GPU/TPU).
# jlstm-pallas, jlstm-cudnn: impl="pallas" (one Pallas kernel per time loop, H <= 256) and
# impl="cudnn" (LSTM); both run on a GPU only (Pallas would run interpreted here, far too slowly).
IMPLS = ["torch", "jlstm", "jlstm-fused", "flax", "cudnn", "jlstm-pallas", "jlstm-cudnn"]
JLSTM_IMPLS = {
    "jlstm": "auto",
    "jlstm-fused": "fused",
    "jlstm-pallas": "pallas",
    "jlstm-cudnn": "cudnn",
}


class Impl(NamedTuple):
    run: Callable[[], Any]  # one iteration, synchronous only after `sync`
    sync: Callable[[Any], Any]  # waits for the result of `run`
    result: Callable[[Any], dict[str, np.ndarray]]  # named arrays compared with torch's
    compile_s: float | None
    memory_mib: float | None = None  # JAX: XLA's temp + output buffers of one call


# ---------------------------------------------------------------------------------------------
# Parameter trees: torch names (jlstm's params) -> flax.linen.RNN / cuDNN's flat vector.
# Both are linear maps, so gradients come back to torch names through jax.vjp.


def directions(case: Case) -> list[str]:
    return ["", "_reverse"] if case.bidirectional else [""]


def to_flax(params: dict[str, jax.Array], case: Case) -> dict:
    """torch-named weights -> params of `FlaxStack` (kernels are transposed, biases folded)."""
    tree = {}
    for layer in range(case.num_layers):
        for sfx, name in zip(
            directions(case), ["fwd", "bwd"][: len(directions(case))], strict=True
        ):
            w_ih, w_hh, b_ih, b_hh = (
                params[f"{kind}_l{layer}{sfx}"]
                for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
            )
            if (
                case.cell == "lstm"
            ):  # flax: input kernels without bias, hidden ones with b_ih + b_hh
                wi, wh, b = (jnp.split(a, 4) for a in (w_ih, w_hh, b_ih + b_hh))
                cell = {f"i{g}": {"kernel": wi[k].T} for k, g in enumerate("ifgo")}
                cell |= {f"h{g}": {"kernel": wh[k].T, "bias": b[k]} for k, g in enumerate("ifgo")}
            else:  # GRU: r, z biases folded; n keeps b_in outside and b_hn inside r * (...)
                wi, wh, bi, bh = (jnp.split(a, 3) for a in (w_ih, w_hh, b_ih, b_hh))
                cell = {
                    "ir": {"kernel": wi[0].T, "bias": bi[0] + bh[0]},
                    "iz": {"kernel": wi[1].T, "bias": bi[1] + bh[1]},
                    "in": {"kernel": wi[2].T, "bias": bi[2]},
                    "hr": {"kernel": wh[0].T},
                    "hz": {"kernel": wh[1].T},
                    "hn": {"kernel": wh[2].T, "bias": bh[2]},
                }
            tree[f"{name}_{layer}"] = cell
    return {"params": tree}


class FlaxStack(nn.Module):
    """torch's stacked (bi)directional RNN out of flax.linen.RNN, time-major like torch."""

    cell: str
    hidden_size: int
    num_layers: int
    bidirectional: bool

    @nn.compact
    def __call__(self, x):
        make = {"lstm": nn.OptimizedLSTMCell, "gru": nn.GRUCell}[self.cell]
        for layer in range(self.num_layers):
            y = nn.RNN(make(self.hidden_size, name=f"fwd_{layer}"), time_major=True)(x)
            if self.bidirectional:
                rnn = nn.RNN(make(self.hidden_size, name=f"bwd_{layer}"), time_major=True)
                y = jnp.concatenate([y, rnn(x, reverse=True, keep_order=True)], axis=-1)
            x = y
        return x


def to_cudnn(params: dict[str, jax.Array], case: Case) -> jax.Array:
    """torch-named weights -> jax.experimental.rnn's flat vector (all matrices, then all biases)."""
    keys = [f"_l{layer}{sfx}" for layer in range(case.num_layers) for sfx in directions(case)]
    mats = [params[w + k].ravel() for k in keys for w in ("weight_ih", "weight_hh")]
    biases = [params[b + k] for k in keys for b in ("bias_ih", "bias_hh")]
    return jnp.concatenate(mats + biases)


# ---------------------------------------------------------------------------------------------
# Implementations of one (case, mode): each returns an Impl that has already run once.


def jax_impl(fn, args, result) -> Impl:
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
    m = compiled.memory_analysis()
    memory_mib = None if m is None else (m.temp_size_in_bytes + m.output_size_in_bytes) / 2**20
    return Impl(lambda: compiled(*args), jax.block_until_ready, result, compile_s, memory_mib)


def make_torch(module, x, cot, mode, device) -> Impl:
    xt = torch.from_numpy(x).to(device)
    gt = torch.from_numpy(cot).to(device)
    sync = (lambda r: torch.cuda.synchronize()) if device.startswith("cuda") else (lambda r: r)
    if mode == "fwd":

        def run():
            with torch.inference_mode():
                return module(xt)

        return Impl(run, sync, lambda r: {"output": r[0].cpu().numpy()}, None)
    xt.requires_grad_(True)

    def run():
        module.zero_grad(set_to_none=True)
        xt.grad = None
        out, _ = module(xt)
        out.backward(gt)
        return xt.grad

    def result(_):
        grads = {k: p.grad.cpu().numpy() for k, p in module.named_parameters()}
        return grads | {"x": xt.grad.cpu().numpy()}

    return Impl(run, sync, result, None)


def make_jax(forward, params, x, cot, mode) -> Impl:
    """`forward(params, x) -> output`, params torch-named; gradients come back torch-named."""
    if mode == "fwd":
        return jax_impl(forward, (params, x), lambda r: {"output": r})

    def loss(p, x, cot):
        return jnp.sum(forward(p, x) * cot)

    def result(g):
        return {k: np.asarray(v) for k, v in g[0].items()} | {"x": np.asarray(g[1])}

    return jax_impl(jax.grad(loss, argnums=(0, 1)), (params, x, cot), result)


def make_impl(name, case, mode, module, x, cot, torch_device, checkpoint_every=None) -> Impl:
    params = jlstm.from_torch(module.state_dict())
    xj, cotj = jnp.asarray(x), jnp.asarray(cot)
    if name == "torch":
        return make_torch(module, x, cot, mode, torch_device)
    if name in JLSTM_IMPLS:
        layer = jlstm.lstm if case.cell == "lstm" else jlstm.gru
        impl = JLSTM_IMPLS[name]
        return make_jax(
            lambda p, x: layer(p, x, impl=impl, checkpoint_every=checkpoint_every)[0],
            params,
            xj,
            cotj,
            mode,
        )
    if name == "flax":
        model = FlaxStack(case.cell, case.hidden_size, case.num_layers, case.bidirectional)
        fparams = to_flax(params, case)
        if mode == "fwd":
            return jax_impl(model.apply, (fparams, xj), lambda r: {"output": r})

        # Time the gradient in flax's own tree; map it back to torch names only to check it.
        def loss(fp, x, cot):
            return jnp.sum(model.apply(fp, x) * cot)

        _, to_torch_names = jax.vjp(lambda p: to_flax(p, case), params)

        def result(g):
            (gp,) = to_torch_names(g[0])
            return {k: np.asarray(v) for k, v in gp.items()} | {"x": np.asarray(g[1])}

        return jax_impl(jax.grad(loss, argnums=(0, 1)), (fparams, xj, cotj), result)
    if name == "cudnn":  # batch-major input, as jax.experimental.rnn.lstm wants
        from jax.experimental import rnn

        D = 2 if case.bidirectional else 1
        zeros = jnp.zeros((D * case.num_layers, case.batch, case.hidden_size), jnp.float32)
        lengths = jnp.full((case.batch,), case.seq_len, jnp.int32)
        sizes = dict(input_size=case.input_size, hidden_size=case.hidden_size)
        sizes |= dict(num_layers=case.num_layers, dropout=0.0, bidirectional=case.bidirectional)

        def forward(w, xb):
            return rnn.lstm(xb, zeros, zeros, w, lengths, **sizes)[0]

        w, xb, cotb = to_cudnn(params, case), jnp.swapaxes(xj, 0, 1), jnp.swapaxes(cotj, 0, 1)
        if mode == "fwd":
            return jax_impl(forward, (w, xb), lambda r: {"output": np.swapaxes(r, 0, 1)})

        def loss(w, xb, cot):
            return jnp.sum(forward(w, xb) * cot)

        _, to_torch_names = jax.vjp(lambda p: to_cudnn(p, case), params)

        def result(g):
            (gp,) = to_torch_names(g[0])
            return {k: np.asarray(v) for k, v in gp.items()} | {"x": np.swapaxes(g[1], 0, 1)}

        return jax_impl(jax.grad(loss, argnums=(0, 1)), (w, xb, cotb), result)
    raise ValueError(f"unknown implementation {name!r}; choose from {IMPLS}")


# ---------------------------------------------------------------------------------------------
# Checking and timing.


def max_rel_err(got: dict, want: dict) -> float:
    """Largest |got - want| per array, relative to that array's largest |want| (float32 scale)."""
    if set(got) != set(want):
        raise ValueError(f"compared arrays differ: {sorted(got)} vs {sorted(want)}")
    errs = []
    for k, w in want.items():
        g = np.asarray(got[k], np.float64)
        if g.shape != w.shape:
            raise ValueError(f"{k}: shape {g.shape} != torch's {w.shape}")
        errs.append(np.max(np.abs(g - w)) / max(np.max(np.abs(w)), 1e-30))
    return float(max(errs))


def time_round_robin(impls: dict[str, Impl], samples: int, sample_s: float) -> dict:
    """Median time per iteration of each implementation over `samples` round-robin samples."""
    iters = {}
    for name, impl in impls.items():  # warm up, then size a sample to about sample_s
        impl.sync(impl.run())
        start = time.perf_counter()
        impl.sync(impl.run())
        iters[name] = max(1, min(1000, round(sample_s / (time.perf_counter() - start))))
    times = {name: [] for name in impls}
    order = list(impls)
    for s in range(samples):
        for name in order[s % len(order) :] + order[: s % len(order)]:
            impl, n = impls[name], iters[name]
            start = time.perf_counter()
            for _ in range(n):
                r = impl.run()
            impl.sync(r)
            times[name].append((time.perf_counter() - start) / n)
    return {
        name: {"median_s": statistics.median(t), "samples_s": t, "iters": iters[name]}
        for name, t in times.items()
    }


def setup(case: Case, device: str):
    """The torch module (seeded weights), input and output cotangent of a case."""
    torch.manual_seed(0)
    module_cls = torch.nn.LSTM if case.cell == "lstm" else torch.nn.GRU
    module = module_cls(
        case.input_size, case.hidden_size, case.num_layers, bidirectional=case.bidirectional
    ).to(device)
    rng = np.random.default_rng(0)
    D = 2 if case.bidirectional else 1
    x = rng.standard_normal((case.seq_len, case.batch, case.input_size), np.float32)
    cot = rng.standard_normal((case.seq_len, case.batch, D * case.hidden_size), np.float32)
    return module, x, cot


def tolerance() -> float:
    """Largest relative error vs torch an implementation may have and still be timed."""
    return 1e-4 if jax.default_backend() == "cpu" else 5e-3  # GPUs may use TF32 for float32


def applies(impl_name: str, case: Case) -> bool:
    """Whether a GPU-only column runs on this backend and case."""
    gpu = jax.default_backend() == "gpu"
    if impl_name in ("cudnn", "jlstm-cudnn"):
        return gpu and case.cell == "lstm"
    if impl_name == "jlstm-pallas":
        return gpu and case.hidden_size <= pallas.MAX_HIDDEN
    return True


def bench_case(name, case, mode, impl_names, args) -> dict:
    module, x, cot = setup(case, args.torch_device)
    tol = tolerance()

    impls, record = {}, {"case": name, "mode": mode, "shape": case._asdict(), "impls": {}}
    record["load_avg_1m"] = os.getloadavg()[0]  # other processes on the cores skew the ratios
    reference = None
    for impl_name in impl_names:
        if not applies(impl_name, case):
            continue
        impl = make_impl(impl_name, case, mode, module, x, cot, args.torch_device)
        got = impl.result(impl.sync(impl.run()))
        if reference is None:
            reference = got
        err = max_rel_err(got, reference)
        rec = record["impls"][impl_name] = {"max_rel_err": err, "compile_s": impl.compile_s}
        print(f"  {impl_name}: max relative error vs torch {err:.1e}", flush=True)
        if err > tol:
            rec["error"] = f"disagrees with torch: max relative error {err:.2e} > {tol:.0e}"
            print(f"  {name}/{mode}/{impl_name}: {rec['error']} -- not timed", flush=True)
            continue
        impls[impl_name] = impl
    for impl_name, timing in time_round_robin(impls, args.samples, args.sample_s).items():
        record["impls"][impl_name] |= timing
    return record


# ---------------------------------------------------------------------------------------------
# Peak memory of one train step (forward + backward) on args.memory_cases.
#
# JAX: XLA's buffer assignment for the compiled step, temp + output bytes (what one call allocates
# beyond its inputs; exact, and an upper bound on what it touches). torch: measured in a fresh
# process from the kernel's count of resident memory: glibc is told to serve every allocation of
# 64 KiB or more with its own mmap and to hand it back on free (MALLOC_MMAP_THRESHOLD_,
# MALLOC_TRIM_THRESHOLD_), so resident memory follows live buffers; after two warm-up steps the
# peak counter is reset (/proc/self/clear_refs) and the peak over one more step, less the resident
# memory before it, is what the step needed (saved activations, oneDNN workspaces, gradients).
# The resident-memory method is not used for JAX: in a process that has run other XLA programs it
# reported far less than XLA's buffer assignment (memory already resident was reused).

CHECKPOINT_EVERY = 16  # jlstm's memory-bounded variant in the memory table
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def torch_memory_child(case_name: str, device: str) -> dict:
    """Runs in the child process: the peak extra resident memory of one torch train step."""
    module, x, cot = setup(CASES[case_name], device)
    impl = make_torch(module, x, cot, "train", device)
    impl.sync(impl.run())
    impl.sync(impl.run())
    base = _proc_status("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM, the peak resident memory, to the current resident memory
    impl.sync(impl.run())
    return {"peak_mib": (_proc_status("VmHWM:") - base) / 2**20}


def _torch_memory(case_name: str, args) -> float | None:
    if args.torch_device != "cpu" or not os.path.exists("/proc/self/clear_refs"):
        return None
    cmd = [sys.executable, "-m", "experiments.bench", "--memory-child", case_name]
    cmd += ["--torch-threads", str(args.torch_threads)]
    env = os.environ | MALLOC_ENV
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        print(f"  train-step memory {case_name}/torch failed: {proc.stderr.strip()[-300:]}")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_mib"]


def bench_memory(args) -> dict:
    """Train-step memory (MiB) of torch, jlstm, jlstm with checkpoint_every, flax, per case; every
    JAX variant is checked against torch's gradients first."""
    results = {}
    for case_name in args.memory_cases:
        case = CASES[case_name]
        module, x, cot = setup(case, args.torch_device)
        reference = make_torch(module, x, cot, "train", args.torch_device)
        want = reference.result(reference.sync(reference.run()))
        row = {"torch": _torch_memory(case_name, args)}
        for label, name, every in [
            ("jlstm", "jlstm", None),
            (f"jlstm checkpoint_every={CHECKPOINT_EVERY}", "jlstm", CHECKPOINT_EVERY),
            ("flax", "flax", None),
        ]:
            if name not in args.impls:
                continue
            impl = make_impl(name, case, "train", module, x, cot, args.torch_device, every)
            err = max_rel_err(impl.result(impl.sync(impl.run())), want)
            if err > tolerance():
                raise RuntimeError(f"{case_name}/{label}: max relative error {err:.1e} vs torch")
            row[label] = impl.memory_mib
        results[case_name] = row
        print(
            f"  train-step memory {case_name}: "
            + ", ".join(f"{k} {_fmt(v, '.1f')} MiB" for k, v in row.items()),
            flush=True,
        )
    return results


def memory_table(results: dict) -> str:
    labels = list(dict.fromkeys(k for row in results.values() for k in row))
    others = [lb for lb in labels if lb != "torch"]
    head = ["case", *(f"{lb} MiB" for lb in labels), *(f"{lb} / torch" for lb in others)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for case_name, row in results.items():
        cells = [case_name, *(_fmt(row.get(lb), ".1f") for lb in labels)]
        t = row.get("torch")
        cells += [_fmt(row[lb] / t if row.get(lb) and t else None, ".2f") for lb in others]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# MNIST training epoch: LSTM(28 -> 64) + Linear(64 -> 10), Adam, batch 64, data in memory.


def bench_epoch(args) -> dict:
    batch, n_batches, lr = 64, 60_000 // 64, 1e-3  # 937 full batches (the last 32 dropped)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n_batches, batch, 28, 28), np.uint8)  # MNIST-shaped noise
    xs = (images / 255.0).astype(np.float32)
    ys = rng.integers(0, 10, (n_batches, batch)).astype(np.int64)

    torch.manual_seed(0)
    rnn, fc = torch.nn.LSTM(28, 64, batch_first=True), torch.nn.Linear(64, 10)
    fc_params = {k: jnp.asarray(v.detach().numpy()) for k, v in fc.state_dict().items()}
    params = {"lstm": jlstm.from_torch(rnn.state_dict()), "fc": fc_params}
    torch_params = [*rnn.parameters(), *fc.parameters()]
    opt = torch.optim.Adam(torch_params, lr=lr)
    xs_t, ys_t = torch.from_numpy(xs), torch.from_numpy(ys)

    def torch_step(xb, yb):
        out, _ = rnn(xb)
        loss = torch.nn.functional.cross_entropy(fc(out[:, -1]), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    def torch_epoch():
        return sum(torch_step(xs_t[i], ys_t[i]) for i in range(n_batches)) / n_batches

    tx = optax.adam(lr)

    def loss_fn(p, xb, yb):
        out, _ = jlstm.lstm(p["lstm"], xb, batch_first=True)
        logits = out[:, -1] @ p["fc"]["weight"].T + p["fc"]["bias"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    def train_step(state, batch):
        p, opt_state = state
        loss, grads = jax.value_and_grad(loss_fn)(p, *batch)
        updates, opt_state = tx.update(grads, opt_state, p)
        return (optax.apply_updates(p, updates), opt_state), loss

    def jax_epoch(state, xs, ys):
        state, losses = jax.lax.scan(train_step, state, (xs, ys))
        return state, losses.mean()

    # Check: one step from the same weights gives the same loss and the same updated weights.
    state = (params, tx.init(params))
    xj, yj = jnp.asarray(xs), jnp.asarray(ys.astype(np.int32))
    (p1, _), loss1 = jax.jit(train_step)(state, (xj[0], yj[0]))
    loss1_t = torch_step(xs_t[0], ys_t[0])
    want = {f"lstm.{k}": v.detach().numpy() for k, v in rnn.state_dict().items()}
    want |= {f"fc.{k}": v.detach().numpy() for k, v in fc.state_dict().items()}
    got = {f"{m}.{k}": v for m in p1 for k, v in p1[m].items()}
    err = max(max_rel_err(got, want), abs(float(loss1) - loss1_t) / abs(loss1_t))
    print(f"  one Adam step vs torch: max relative error {err:.1e}", flush=True)

    start = time.perf_counter()
    epoch = jax.jit(jax_epoch, donate_argnums=0).lower(state, xj, yj).compile()
    compile_s = time.perf_counter() - start
    times, losses = {"torch": [], "jlstm": []}, {}
    for s in range(args.epoch_samples):
        for name in ["torch", "jlstm"] if s % 2 == 0 else ["jlstm", "torch"]:
            start = time.perf_counter()
            if name == "torch":
                losses[name] = torch_epoch()
            else:
                state, loss = epoch(state, xj, yj)
                losses[name] = float(loss)  # waits for the epoch
            times[name].append(time.perf_counter() - start)
            print(f"  epoch {s} {name}: {times[name][-1]:.2f} s", flush=True)
    rec = {"batches": n_batches, "batch": batch, "check_max_rel_err": err, "compile_s": compile_s}
    rec["load_avg_1m"] = os.getloadavg()[0]
    rec |= {name: {"median_s": statistics.median(t), "samples_s": t} for name, t in times.items()}
    rec["ratio_jlstm_torch"] = rec["jlstm"]["median_s"] / rec["torch"]["median_s"]
    rec["last_epoch_mean_loss"] = losses
    return rec


# ---------------------------------------------------------------------------------------------
# Report.


def environment(args) -> dict:
    def git(*cmd):
        try:
            return subprocess.run(["git", *cmd], capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""

    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [ln for ln in f if ln.startswith("model name")]
        cpu = names[0].split(":", 1)[1].strip() if names else cpu
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, "-m", "experiments.bench", *sys.argv[1:]]),
        "git_commit": git("rev-parse", "--short", "HEAD")
        + ("-dirty" if git("status", "-s", "--untracked-files=no") else ""),
        "versions": {
            "python": platform.python_version(),
            "jax": jax.__version__,
            "jaxlib": jaxlib.__version__,
            "flax": flax.__version__,
            "optax": optax.__version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
        },
        "device": {
            "jax_backend": jax.default_backend(),
            "jax_devices": [str(d) for d in jax.devices()],
            "torch_device": args.torch_device,
            "cpu": cpu,
            "cpu_count": os.cpu_count(),
            "load_avg_1m_at_start": os.getloadavg()[0],
        },
        "threads": {
            "torch_intra_op": torch.get_num_threads(),
            "torch_inter_op": torch.get_num_interop_threads(),
            "omp_env": {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "GOMP_"))},
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "xla_cpu_threads": "XLA default (one per core)",
            "jlstm_native_threads": os.environ.get("JLSTM_NATIVE_THREADS", "one per core"),
        },
        # Which loop jlstm's LSTM runs with impl="auto": the C++ one, or why not.
        "jlstm_native": native.unavailable_reason() or "available",
        "config": {k: v for k, v in vars(args).items()},
    }


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def table(results: list[dict]) -> str:
    """Markdown: medians (ms), ratios to torch and jlstm/flax, JAX compile seconds."""
    names = [n for n in IMPLS if any("median_s" in r["impls"].get(n, {}) for r in results)]
    others = [n for n in names if n != "torch"]
    head = ["case", "mode", *(f"{n} ms" for n in names), *(f"{n}/torch" for n in others)]
    head += ["jlstm/flax", *(f"{n} compile s" for n in others)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        t = {n: r["impls"].get(n, {}).get("median_s") for n in IMPLS}

        def ratio(a, b, t=t):
            return t[a] / t[b] if t[a] and t[b] else None

        row = [r["case"], r["mode"], *(_fmt(t[n] and t[n] * 1e3, ".2f") for n in names)]
        row += [_fmt(ratio(n, "torch"), ".2f") for n in others] + [
            _fmt(ratio("jlstm", "flax"), ".2f")
        ]
        row += [_fmt(r["impls"].get(n, {}).get("compile_s"), ".1f") for n in others]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"cases {QUICK_CASES}, 3 short samples")
    p.add_argument("--cases", help=f"comma-separated subset of {list(CASES)}")
    p.add_argument("--modes", default="fwd,train", help="comma-separated subset of fwd,train")
    p.add_argument("--impls", default=",".join(IMPLS), help="cudnn runs only on a GPU backend")
    p.add_argument("--samples", type=int, help="round-robin samples per case (default 9, quick 3)")
    p.add_argument("--sample-s", type=float, help="seconds per sample (default 0.2, quick 0.05)")
    p.add_argument("--epoch-samples", type=int, help="MNIST epochs per framework (default 3)")
    p.add_argument("--no-epoch", action="store_true", help="skip the MNIST training epoch")
    p.add_argument("--torch-threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--torch-device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="runs/bench/bench.json", help="where the JSON goes")
    p.add_argument(
        "--memory-cases", default="long", help="cases whose train-step peak memory is measured"
    )
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--memory-child", metavar="CASE", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_child:
        return args
    args.cases = args.cases.split(",") if args.cases else QUICK_CASES if args.quick else list(CASES)
    args.modes, args.impls = args.modes.split(","), args.impls.split(",")
    args.samples = args.samples or (3 if args.quick else 9)
    args.sample_s = args.sample_s or (0.05 if args.quick else 0.2)
    args.epoch_samples = args.epoch_samples or (1 if args.quick else 3)
    args.memory_cases = [] if args.no_memory else args.memory_cases.split(",")
    for value, allowed in [
        (args.cases, CASES),
        (args.modes, MODES),
        (args.impls, IMPLS),
        (args.memory_cases, CASES),
    ]:
        if bad := [v for v in value if v not in allowed]:
            p.error(f"unknown {bad}; choose from {list(allowed)}")
    if "torch" not in args.impls or args.impls[0] != "torch":
        args.impls = ["torch", *(i for i in args.impls if i != "torch")]  # torch is the reference
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    if args.memory_child:
        print(json.dumps(torch_memory_child(args.memory_child, args.torch_device)))
        return 0
    env = environment(args)
    print(
        f"{env['date']}  jax {jax.__version__} ({jax.default_backend()})  torch {torch.__version__}"
        f" ({args.torch_device}, {torch.get_num_threads()} threads)  {env['device']['cpu']}"
        f"  jlstm.native: {env['jlstm_native']}"
    )
    results, start = [], time.perf_counter()
    for name in args.cases:
        for mode in args.modes:
            print(f"{name} {mode} {tuple(CASES[name])}", flush=True)
            results.append(bench_case(name, CASES[name], mode, args.impls, args))
            print(table(results[-1:]).splitlines()[-1], flush=True)
    epoch = None if args.no_epoch else bench_epoch(args)
    memory = bench_memory(args)
    env["total_s"] = time.perf_counter() - start
    print("\n" + table(results))
    if memory:
        print(
            "\nMemory of one train step, MiB beyond its inputs (JAX: XLA temp + output buffers;"
            " torch: peak resident memory):"
        )
        print(memory_table(memory))
    if epoch:
        print(
            f"\nMNIST epoch ({epoch['batches']} batches of {epoch['batch']}): "
            f"torch {epoch['torch']['median_s']:.2f} s, jlstm {epoch['jlstm']['median_s']:.2f} s "
            f"(ratio {epoch['ratio_jlstm_torch']:.2f}; jlstm compile {epoch['compile_s']:.1f} s)"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            env | {"results": results, "mnist_epoch": epoch, "peak_memory": memory}, indent=1
        )
        + "\n"
    )
    print(f"\nwrote {out} ({env['total_s']:.0f} s)")
    loads = [r["load_avg_1m"] for r in results] + ([epoch["load_avg_1m"]] if epoch else [])
    if loads and max(loads) > 1.5 * os.cpu_count():
        print(
            f"WARNING: load average reached {max(loads):.1f} on {os.cpu_count()} cores: other "
            "processes shared the CPU, and torch's OpenMP threads lose far more to that than XLA's "
            "(ratios to torch come out too low); rerun on a quiet machine"
            + (" or with --torch-threads 1" if args.torch_threads > 1 else "")
        )
    failed = [r for r in results if any("error" in v for v in r["impls"].values())]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
