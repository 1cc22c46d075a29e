"""A whole MNIST training epoch, torch against jlstm: LSTM(28 -> 64) + Linear(64 -> 10), Adam,
batch 64, data in memory (MNIST-shaped noise: the time does not depend on the pixels).

torch runs its usual eager loop, one Python step per batch; jlstm's epoch is one jitted
``lax.scan`` over the batches. Both start from the same weights, and one Adam step of each is
compared before timing.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

import jlstm
from experiments.bench import machine
from experiments.bench.timing import max_rel_err, time_round_robin


def bench_epoch(args) -> dict:
    load = machine.load_now()
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
    times, losses, probe_s = {"torch": [], "jlstm": []}, {}, []  # probed after each epoch
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
            probe = machine.gemm_probe()
            probed = time_round_robin({}, 3, 0, probe, machine.PROBE_S, machine.PROBE_SETTLE_S)
            probe_s += probed["probe"]["samples_s"]
    rec = {"batches": n_batches, "batch": batch, "check_max_rel_err": err, "compile_s": compile_s}
    rec |= machine.load_since(load)
    rec |= machine.probe_record({"median_s": statistics.median(probe_s), "samples_s": probe_s})
    rec |= {name: {"median_s": statistics.median(t), "samples_s": t} for name, t in times.items()}
    rec["ratio_jlstm_torch"] = rec["jlstm"]["median_s"] / rec["torch"]["median_s"]
    rec["last_epoch_mean_loss"] = losses
    return rec
