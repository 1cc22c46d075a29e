"""The training loop of the epoch-based programs: resuming, jitted chunks of steps, evaluation,
the optimizer, and stopping on a signal.

(``training``, not ``train``: each program's entry point is its ``train(config)``.)
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from experiments import cli, preemption
from experiments.mesh import batch_sharded, check_batch_size, device_name, replicate, replicated
from experiments.workdir import SUMMARY, Checkpoints, Workdir, write_json


def chunk_length(steps_per_epoch: int, eval_every: int) -> int:
    """Training steps per jitted chunk: the progress bar moves ~10 times per epoch, and a chunk
    never runs past an evaluation."""
    chunk = max(1, -(-steps_per_epoch // 10))
    return min(chunk, eval_every) if eval_every else chunk


def chunk_ends(start: int, end: int, chunk: int, eval_every: int) -> list[int]:
    """Global steps in ``(start, end]`` where a jitted chunk stops: every ``chunk`` steps (so
    the progress bar moves), at each multiple of ``eval_every``, and at ``end``."""
    stops = set(range(start + chunk, end, chunk)) | {end}
    if eval_every:
        stops |= set(range(start - start % eval_every + eval_every, end, eval_every))
    return sorted(stops)


@dataclasses.dataclass(frozen=True)
class Position:
    """Where an epoch-based run stands; saved in each checkpoint's ``meta``."""

    epoch: int = 0  # epochs finished
    step: int = 0  # training steps taken
    seconds: float = 0.0  # wall time of training and evaluation so far
    step_seconds: float = 0.0  # of which in training steps
    # Per-step training metrics since the last evaluation, where a run stopped between two.
    train: dict[str, list[float]] = dataclasses.field(default_factory=dict)


def resume(
    checkpoints: Checkpoints, workdir: Workdir, state: Any, meta: dict | None, epochs: int
) -> tuple[Any, Position]:
    """``(state, position)``: the fresh ``state`` at the start, or the checkpoint's (``meta``
    from :func:`workdir.saved_meta`), dropping metrics written after it."""
    if meta is None:
        workdir.metrics.keep_until(-1)
        return state, Position()
    state, meta = checkpoints.restore(state)
    at = Position(**{f.name: meta[f.name] for f in dataclasses.fields(Position) if f.name in meta})
    workdir.metrics.keep_until(at.step)
    if at.epoch < epochs:
        print(f"resuming {workdir.path} after epoch {at.epoch}/{epochs} (step {at.step})")
    else:
        print(
            f"{workdir.path} holds a run already finished; rewriting its summary and plots "
            "(add --restart to train again)"
        )
    return state, at


def train_epochs(
    config: Any,
    state: Any,
    at: Position,
    *,
    steps_per_epoch: int,
    chunk: int,
    epoch_steps: Callable[[int], Callable[[Any, int, int], tuple[Any, dict]]],
    evaluate: Callable[[Any], dict],
    workdir: Workdir,
    checkpoints: Checkpoints,
    unit: str,
    plot: Callable[[list[dict]], None] = lambda records: None,
) -> tuple[Any, Position]:
    """Trains from ``at`` to ``config.epochs`` epochs of ``config.batch_size`` examples, logging
    to ``metrics.jsonl`` after each epoch (and every ``config.eval_every`` steps) and saving a
    checkpoint after each epoch. Returns the final ``(state, position)``.

    ``epoch_steps(epoch)`` prepares an epoch (shuffles it) and returns ``run(state, start, n) ->
    (state, metrics)``, which takes the epoch's steps ``start .. start + n - 1`` (``n <= chunk``);
    ``metrics`` maps names to per-step arrays (at least ``n`` long, replicated; ``"loss"`` is
    required), logged as ``train_<name>``, the mean since the last evaluation. ``evaluate(state)``
    returns the test metrics of a log record (``"test_accuracy"`` is required).

    On SIGTERM or SIGINT (:mod:`experiments.preemption`) it finishes the chunk it is in, saves a
    checkpoint there (mid-epoch, with the training metrics since the last evaluation), calls
    ``plot(records)`` on the metrics so far (the primary process only) and raises
    :class:`preemption.Stopped`; resuming from that checkpoint gives the same metrics as a run
    that never stopped.
    """
    started, seconds = time.perf_counter(), at.seconds
    epoch, step, step_seconds = at.epoch, at.step, at.step_seconds
    train = {name: list(values) for name, values in at.train.items()}
    chunks = 0  # chunks run by this process: the counter of the preemption sync
    signum = None  # the signal to stop for, once every process should stop

    def elapsed() -> float:
        return round(seconds + time.perf_counter() - started, 3)

    def record(train: dict[str, list[float]]) -> dict:
        result = {"epoch": round(step / steps_per_epoch, 4), "step": step}
        result |= {f"train_{name}": float(np.mean(values)) for name, values in train.items()}
        result |= evaluate(state)
        result["seconds"] = elapsed()
        workdir.metrics.append(result)
        return result

    def save(train: dict[str, list[float]]) -> Position:
        at = Position(epoch, step, elapsed(), step_seconds, train)
        meta = dataclasses.asdict(at) | {"config": dataclasses.asdict(config)}
        checkpoints.save(step, state, meta)
        return at

    while epoch < config.epochs:
        first, last = epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch
        bar = progress(
            steps_per_epoch * config.batch_size,
            desc=f"epoch {epoch + 1}/{config.epochs}",
            unit=unit,
            initial=(step - first) * config.batch_size,
            unit_scale=True,
        )
        run = epoch_steps(epoch)
        for end in chunk_ends(first, last, chunk, config.eval_every):
            if end <= step:  # taken before the run stopped mid-epoch
                continue
            n = end - step
            t0 = time.perf_counter()
            state, metrics = run(state, step - first, n)
            for name, values in metrics.items():
                train.setdefault(name, []).extend(np.asarray(values)[:n].tolist())
            step_seconds += time.perf_counter() - t0
            step = end
            bar.update(n * config.batch_size)
            bar.set_postfix(loss=f"{np.mean(train['loss'][-n:]):.4f}")
            signum = preemption.stop_signal(checkpoints, chunks)
            chunks += 1
            if config.eval_every and step % config.eval_every == 0 and end < last:
                r = record(train)
                train = {}
                if workdir.primary:  # (a disabled bar still writes)
                    bar.write(f"  step {step}: test accuracy {r['test_accuracy']:.2%}")
            if signum is not None and end < last:
                save(train)
                bar.close()
                _plot_so_far(plot, workdir)
                raise preemption.Stopped(step, signum)
        epoch += 1
        r = record(train)
        train = {}
        bar.set_postfix(loss=f"{r['train_loss']:.4f}", test_acc=f"{r['test_accuracy']:.2%}")
        bar.close()
        at = save(train)
        if signum is not None and epoch < config.epochs:  # (a finished run just ends)
            _plot_so_far(plot, workdir)
            raise preemption.Stopped(step, signum)
    return state, at


def _plot_so_far(plot: Callable[[list[dict]], None], workdir: Workdir) -> None:
    records = workdir.metrics.records() if workdir.primary else []
    if records:
        plot(records)


def jit_chunk(step: Callable, chunk: int, mesh: Mesh) -> Callable:
    """Jits ``step(state, batch, key) -> (state, metrics)`` into ``train_chunk(state, start, n,
    epoch, key) -> (state, metrics)``, data-parallel over ``mesh``.

    ``train_chunk`` takes the ``n <= chunk`` steps ``start .. start + n - 1`` of an epoch:
    ``epoch`` is a tuple of ``(steps, batch, ...)`` arrays with the batch split over the devices
    (:func:`input_pipeline.shard_batches`); step ``i`` of the chunk gets ``batch = tuple(a[start
    + i] for a in epoch)`` and ``fold_in(key, i)`` (None where ``key`` is None). The scan always
    has ``chunk`` iterations, those past ``n`` do nothing (metrics 0), so one compilation serves
    every chunk.
    State and metrics are replicated: each device computes the gradient of its share of the batch
    and XLA sums them across devices, so every device takes the same step. The state is donated.
    """
    rep, data = replicated(mesh), batch_sharded(mesh)

    @functools.partial(
        jax.jit, donate_argnums=0, in_shardings=(rep, rep, rep, data, rep), out_shardings=rep
    )
    def train_chunk(state, start, n, epoch, key):
        last = epoch[0].shape[0] - 1

        def body(state, i):
            batch = tuple(a[jnp.minimum(start + i, last)] for a in epoch)
            step_key = None if key is None else jax.random.fold_in(key, i)
            metrics = jax.eval_shape(step, state, batch, step_key)[1]
            zeros = jax.tree.map(lambda m: jnp.zeros(m.shape, m.dtype), metrics)
            return jax.lax.cond(
                i < n, lambda s: step(s, batch, step_key), lambda s: (s, zeros), state
            )

        return jax.lax.scan(body, state, jnp.arange(chunk))

    return train_chunk


def jit_evaluate(logits_fn: Callable, mesh: Mesh) -> Callable:
    """Jits ``logits_fn(params, x) -> (N, classes)`` into ``evaluate(params, x, labels) ->
    (loss_sum, correct, predictions)`` over a test set of ``(batches, batch, ...)`` arrays with
    the batch split over ``mesh`` (:func:`input_pipeline.eval_batches`); examples labelled -1
    count for nothing.
    """
    rep, data = replicated(mesh), batch_sharded(mesh)

    @functools.partial(jax.jit, in_shardings=(rep, data, data), out_shardings=rep)
    def evaluate(params, x, labels):
        def batch(args):
            x, y = args
            logits = logits_fn(params, x)
            valid = y >= 0
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(y, 0))
            pred = jnp.argmax(logits, axis=-1)
            return jnp.sum(loss * valid), jnp.sum((pred == y) & valid), pred

        loss, correct, pred = jax.lax.map(batch, (x, labels))
        return loss.sum(), correct.sum(), pred.reshape(-1)

    return evaluate


@functools.cache
def compiled(
    config: Any, logits_fn: Callable, make_step: Callable, total_steps: int, chunk: int, mesh: Mesh
) -> tuple[optax.GradientTransformation, Callable, Callable]:
    """``(tx, train_chunk, evaluate)`` for the model and optimizer that ``config`` describes,
    data-parallel over ``mesh``: Adam from ``config.lr``, ``.schedule`` and ``.grad_clip``
    (:func:`optimizer`), :func:`jit_chunk` of ``make_step(config, tx)`` and :func:`jit_evaluate`
    of ``logits_fn(config, params, x)``.

    Cached, so that runs in one process (tests, a notebook) compile each model once; a program
    passes its config with the fields these functions ignore set to fixed values, so that those
    do not count.
    """
    tx = optimizer(config.lr, total_steps, schedule=config.schedule, grad_clip=config.grad_clip)
    evaluate = jit_evaluate(functools.partial(logits_fn, config), mesh)
    return tx, jit_chunk(make_step(config, tx), chunk, mesh), evaluate


def steps_per_epoch(config: Any, n_train: int, what: str, mesh: Mesh) -> int:
    """Full batches of ``config.batch_size`` in ``n_train`` examples (``what``: "images"); raises
    :class:`~experiments.cli.ExperimentError` if there is none or the batch does not split over
    ``mesh``."""
    if config.batch_size > n_train:
        raise cli.ExperimentError(
            f"--batch-size {config.batch_size} is larger than the {n_train} training {what}"
        )
    check_batch_size(config.batch_size, mesh)
    return n_train // config.batch_size


def start(
    config: Any,
    uncompiled: dict,
    logits_fn: Callable,
    make_step: Callable,
    steps: int,
    params: Any,
    mesh: Mesh,
    run: tuple[Checkpoints, Workdir, dict | None],
) -> tuple[Callable, Callable, int, Any, Position]:
    """What an epoch-based program needs before its loop: ``(train_chunk, evaluate, chunk, state,
    at)``, :func:`compiled` for ``config`` with the fields in ``uncompiled`` fixed, and the
    replicated ``(params, optimizer state)`` resumed from ``run = (checkpoints, workdir, meta)``
    (``steps`` per epoch)."""
    chunk = chunk_length(steps, config.eval_every)
    fixed = dataclasses.replace(config, **uncompiled)
    tx, train_chunk, evaluate = compiled(
        fixed, logits_fn, make_step, config.epochs * steps, chunk, mesh
    )
    checkpoints, workdir, meta = run
    state = replicate((params, tx.init(params)), mesh)
    state, at = resume(checkpoints, workdir, state, meta, config.epochs)
    return train_chunk, evaluate, chunk, state, at


def finish(
    config: Any,
    at: Position,
    state: Any,
    mesh: Mesh,
    workdir: Workdir,
    plot: Callable[[list[dict]], None],
    extra: Callable[[list[dict]], dict] = lambda records: {},
) -> dict:
    """Writes ``summary.json`` (:func:`epoch_summary` and ``extra(records)``) and the final plot,
    says so, and returns the summary."""
    records = workdir.metrics.records()
    summary = epoch_summary(config, at, records, state[0], mesh) | extra(records)
    write_json(workdir / SUMMARY, summary)
    plot(records)
    print(
        f"test accuracy {summary['test_accuracy']:.2%} after {config.epochs} epochs, "
        f"{summary['train_seconds']:.0f} s of training; wrote {workdir.path}"
    )
    return summary


def epoch_summary(config: Any, at: Position, records: list[dict], params: Any, mesh: Mesh) -> dict:
    """``summary.json`` of an epoch-based run whose log ends with ``test_accuracy``/``test_loss``."""
    last = records[-1]
    return {
        "test_accuracy": last["test_accuracy"],
        "test_loss": last["test_loss"],
        "epochs": config.epochs,
        "steps": at.step,
        "train_seconds": last["seconds"],
        "examples_per_second": round(at.step * config.batch_size / max(at.step_seconds, 1e-9), 1),
        "num_params": num_params(params),
        "device": device_name(mesh),
        "processes": jax.process_count(),
        "config": dataclasses.asdict(config),
    }


def optimizer(
    lr: float, total_steps: int, *, schedule: str = "cosine", grad_clip: float = 0.0
) -> optax.GradientTransformation:
    """Adam; ``schedule="cosine"``: linear warmup over 5 % of the steps, cosine decay to 0."""
    if schedule == "cosine":
        warmup = max(1, total_steps // 20)
        lr = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total_steps, warmup + 1))
    adam = optax.adam(lr)
    return optax.chain(optax.clip_by_global_norm(grad_clip), adam) if grad_clip > 0 else adam


def num_params(params: Any) -> int:
    return sum(x.size for x in jax.tree.leaves(params))


def progress(total: int, *, desc: str, unit: str, initial: int = 0, unit_scale: bool = False):
    """A tqdm bar (on stderr) for ``total`` units; ``unit_scale=True`` shows 12.3k ex/s. Only the
    first process of a multi-process run shows it."""
    from tqdm.auto import tqdm

    return tqdm(
        disable=jax.process_index() > 0,
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        unit_scale=unit_scale,
        dynamic_ncols=True,
        smoothing=0.1,
    )
