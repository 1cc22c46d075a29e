"""sin -> cos with a carried recurrent state (the PyTorch tutorial's RNN regressor).

    make train-regression                          # LSTM; writes runs/regression/
    make train-regression ARGS="--cell rnn"        # the tutorial's plain RNN (also: --cell gru)

Training step k sees the segment t in [k*pi, (k+1)*pi) of 10 points, input sin(t), target cos(t).
The recurrent state at the end of segment k is the initial state of segment k+1, with gradients
cut in between (``jax.lax.stop_gradient``, the JAX form of the tutorial's ``h_state.data``). A
linear layer maps every step's output to a prediction; MSE loss; Adam. The whole run is a
``lax.scan`` over segments, jitted in chunks of ``--eval-every`` steps. ``eval_mse`` is measured on
the 20 segments that follow the training range, the state carried in from training. The work dir
gets ``metrics.jsonl``, ``summary.json``, ``prediction.png``, ``curves.png`` and an orbax
checkpoint; rerunning the same command resumes, ``--restart`` starts over.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import cli, models, plots, preemption, training
from experiments.cli import option, shared
from experiments.mesh import device_name
from experiments.workdir import (
    SUMMARY,
    Checkpoints,
    Workdir,
    run_in_workdir,
    saved_meta,
    write_json,
)

POINTS = 10  # time steps per segment
EVAL_SEGMENTS = 20  # segments after training on which eval_mse is measured


@dataclasses.dataclass(frozen=True)
class Config:
    cell: str = option("lstm", "recurrent layer", choices=models.CELLS)
    steps: int = option(1000, "training segments, one Adam step each", type=cli.positive_int)
    hidden_size: int = option(32, "hidden units", type=cli.positive_int)
    lr: float = option(0.01, "peak learning rate of Adam (cosine schedule with warmup)",
                       type=cli.positive_float)  # fmt: skip
    eval_every: int = option(100, "evaluate, log and checkpoint every N steps",
                             type=cli.positive_int)  # fmt: skip
    seed: int = option(0, "seed of the initial weights", type=cli.nonnegative_int)
    workdir: str = option("runs/regression", "directory for metrics, plots and checkpoints")
    restart: bool = shared("restart")
    keep_checkpoints: int = shared("keep_checkpoints")


def segments(first: int, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(t, sin t, cos t)`` of segments ``first .. first + count - 1``, each ``(count, 10)``.

    Computed as ``(-1)^k sin(u)``, ``(-1)^k cos(u)`` with ``u`` in ``[0, pi)``, so far-away
    segments are as exact in float32 as the first one.
    """
    k = np.arange(first, first + count)[:, None]
    u = np.pi * np.arange(POINTS) / POINTS
    sign = np.where(k % 2 == 0, 1.0, -1.0)
    t = np.pi * k + u
    f32 = functools.partial(np.asarray, dtype=np.float32)
    return t, f32(sign * np.sin(u)), f32(sign * np.cos(u))


def predict(cell: str, params: dict, x: jax.Array, state):
    """``(prediction, state)`` for a ``(L,)`` input sequence and the carried state."""
    output, state = models.recurrent(cell, params, x[:, None], state)
    return models.head(params, output)[:, 0], state


def zero_state(cell: str, hidden_size: int):
    h = jnp.zeros((1, hidden_size), jnp.float32)  # (num_layers, H): unbatched
    return (h, h) if cell == "lstm" else h


@functools.cache
def compiled(cell: str, lr: float, steps: int):
    """``(tx, train_chunk, evaluate)``; cached, so that runs in one process (tests, a notebook)
    compile each model once."""
    tx = training.optimizer(lr, steps)
    return tx, make_train_chunk(cell, tx), make_evaluate(cell)


def make_train_chunk(cell: str, tx: optax.GradientTransformation):
    """A jitted ``(state, xs, ys) -> (state, losses)``; ``state = (params, opt_state, carried)``,
    ``xs`` and ``ys`` the ``(segments, 10)`` inputs and targets of consecutive segments."""

    def loss_fn(params, carried, x, y):
        prediction, carried = predict(cell, params, x, carried)
        return jnp.mean((prediction - y) ** 2), carried

    def step(state, xy):
        params, opt_state, carried = state
        (loss, carried), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, carried, *xy)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return (params, opt_state, jax.lax.stop_gradient(carried)), loss

    @jax.jit
    def train_chunk(state, xs, ys):
        return jax.lax.scan(step, state, (xs, ys))

    return train_chunk


def make_evaluate(cell: str):
    """A jitted ``(params, carried, x, y) -> (mse, prediction)`` over the concatenated evaluation
    segments: carrying the state across segments is running them as one sequence."""

    @jax.jit
    def evaluate(params, carried, x, y):
        prediction, _ = predict(cell, params, x.reshape(-1), carried)
        return jnp.mean((prediction - y.reshape(-1)) ** 2), prediction

    return evaluate


def train(config: Config) -> dict:
    """Trains (or resumes) as ``config`` says, writes the work dir, returns the summary."""
    return run_in_workdir(config, _train)


def _train(config: Config, workdir: Workdir, checkpoints: Checkpoints) -> dict:
    meta = saved_meta(checkpoints, config, free=cli.RESUMABLE_CHANGES)
    cell = config.cell
    tx, train_chunk, evaluate = compiled(cell, config.lr, config.steps)
    params = models.init(jax.random.key(config.seed), cell, 1, config.hidden_size, 1)
    state = (params, tx.init(params), zero_state(cell, config.hidden_size))
    if meta is None:
        step, seconds = 0, 0.0
        workdir.metrics.keep_until(-1)
    else:
        state, meta = checkpoints.restore(state)
        step, seconds = meta["step"], meta["seconds"]
        workdir.metrics.keep_until(step)
        if step < config.steps:
            print(f"resuming {workdir.path} at step {step}/{config.steps}")
        else:
            print(
                f"{workdir.path} holds a run already finished; rewriting its summary and plots "
                "(add --restart to train again)"
            )
    _, xs, ys = segments(0, config.steps + EVAL_SEGMENTS)
    print(
        f"sin -> cos: {cell} {config.hidden_size}, {training.num_params(params)} parameters, "
        f"{config.steps} steps of {POINTS} points, lr {config.lr} on {device_name()}"
    )

    def write_curves(records: list[dict]) -> None:
        plots.plot_curves(
            workdir / "curves.png",
            records,
            [(("train_loss", "eval_mse"), "MSE", "log")],
            title=f"sin -> cos, {cell} {config.hidden_size}",
        )

    bar = training.progress(config.steps, desc=f"{cell} regression", unit="step", initial=step)
    started = time.perf_counter()
    prediction = None
    chunks = 0  # the counter of the preemption sync
    while step < config.steps:
        end = min(step + config.eval_every, config.steps)
        state, losses = train_chunk(state, xs[step:end], ys[step:end])
        params, _, carried = state
        mse, prediction = evaluate(
            params, carried, xs[end : end + EVAL_SEGMENTS], ys[end : end + EVAL_SEGMENTS]
        )
        step = end
        record = {
            "step": step,
            "train_loss": float(np.mean(losses)),
            "eval_mse": float(mse),
            "seconds": round(seconds + time.perf_counter() - started, 3),
        }
        workdir.metrics.append(record)
        meta = {"step": step, "seconds": record["seconds"], "config": dataclasses.asdict(config)}
        checkpoints.save(step, state, meta)
        bar.update(end - bar.n)
        bar.set_postfix(loss=f"{record['train_loss']:.2e}", eval_mse=f"{record['eval_mse']:.2e}")
        signum = preemption.stop_signal(checkpoints, chunks)
        chunks += 1
        if signum is not None and step < config.steps:  # (every chunk ends in a checkpoint)
            bar.close()
            write_curves(workdir.metrics.records())
            raise preemption.Stopped(step, signum)
    bar.close()

    params, _, carried = state
    if prediction is None:  # a finished run, rerun: nothing was trained or evaluated
        _, prediction = evaluate(params, carried, xs[step:], ys[step:])
    records = workdir.metrics.records()
    last = records[-1]
    summary = {
        "eval_mse": last["eval_mse"],
        "train_loss": last["train_loss"],
        "steps": config.steps,
        "train_seconds": last["seconds"],
        "num_params": training.num_params(params),
        "device": device_name(),
        "config": dataclasses.asdict(config),
    }
    write_json(workdir / SUMMARY, summary)
    t, x, y = segments(config.steps, EVAL_SEGMENTS)
    plot_prediction(
        workdir / "prediction.png",
        t.reshape(-1),
        x.reshape(-1),
        y.reshape(-1),
        np.asarray(prediction),
        title=f"{cell} {config.hidden_size} after {config.steps} steps: "
        f"eval MSE {last['eval_mse']:.2e} on the {EVAL_SEGMENTS} segments that follow",
    )
    write_curves(records)
    print(f"eval MSE {last['eval_mse']:.2e} after {config.steps} steps; wrote {workdir.path}")
    return summary


def plot_prediction(path, t, x, y, prediction, *, title: str) -> None:
    """The tutorial's picture: sin input, cos target and the prediction over ``t``."""
    plt = plots.pyplot()
    fig, ax = plt.subplots(figsize=(11, 3.6))
    ax.plot(t, x, color="tab:gray", linestyle=":", label="input sin(t)")
    ax.plot(t, y, color="tab:red", label="target cos(t)")
    ax.plot(t, prediction, color="tab:blue", linestyle="--", marker=".", label="prediction")
    ax.set_xlabel("t")
    ax.set_title(title, fontsize=10)
    ax.set_ylim(-1.25, 1.55)  # room for the legend above the curves
    ax.legend(loc="upper center", ncol=3, fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(cli.main(train, Config, description=__doc__, prog="python -m experiments.regression"))
