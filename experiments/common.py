"""What every training program here shares: flags, the work dir, metrics, checkpoints, data,
the epoch loop and plots.

A program declares its config as a frozen dataclass whose fields are made with :func:`option`,
and runs as ``sys.exit(common.main(train, Config, argv, __doc__))``: flags come from the fields,
an :class:`ExperimentError` ends the run with one line on stderr instead of a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import importlib.util
import json
import logging
import math
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from experiments import preemption

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"


class ExperimentError(Exception):
    """A problem the user can fix; ``main`` prints its message as one line, without a traceback."""


# ---------------------------------------------------------------------------------------- flags


def positive_int(text: str) -> int:
    value = _number(int, text, "a positive integer")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def nonnegative_int(text: str) -> int:
    value = _number(int, text, "an integer >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = _number(float, text, "a positive number")
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def nonnegative_float(text: str) -> float:
    value = _number(float, text, "a number >= 0")
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def _number(kind: type, text: str, what: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None


def option(default: Any, help: str, *, type: Callable | None = None, choices=None) -> Any:
    """A config field that is also a command-line flag (``hidden_size`` -> ``--hidden-size``)."""
    return dataclasses.field(
        default=default, metadata={"help": help, "type": type, "choices": choices}
    )


def parse_config(
    config_cls: type,
    argv: Sequence[str] | None,
    description: str | None = None,
    prog: str | None = None,
):
    """Builds an argparse parser from ``config_cls``'s fields and returns the parsed config."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for field in dataclasses.fields(config_cls):
        flag = "--" + field.name.replace("_", "-")
        meta = field.metadata
        if field.default is False:
            parser.add_argument(flag, action="store_true", help=meta["help"])
            continue
        kind = meta["type"] or (str if field.default is None else type(field.default))
        parser.add_argument(
            flag,
            type=kind,
            default=field.default,
            choices=meta["choices"],
            metavar=None if meta["choices"] else field.name.upper(),
            help=f"{meta['help']} (default: {field.default})",
        )
    return config_cls(**vars(parser.parse_args(argv)))


def main(
    train: Callable[[Any], Any],
    config_cls: type,
    argv: Sequence[str] | None = None,
    description: str | None = None,
    prog: str | None = None,
) -> int:
    """Parses flags, runs ``train(config)`` and turns user errors into one line and exit code 1,
    a stop on SIGTERM or SIGINT (:mod:`experiments.preemption`) into one line and 143 or 130."""
    config = parse_config(config_cls, argv, description, prog)
    quiet_libraries()
    try:
        train(config)
    except ExperimentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except preemption.Stopped as e:
        command = shlex.join(sys.argv[1:] if argv is None else argv)
        print(
            f"{e}, where it saved a checkpoint; rerun the same command to resume: "
            f"{prog or shlex.quote(sys.argv[0])} {command}".rstrip(),
            file=sys.stderr,
        )
        return 128 + e.signum
    except KeyboardInterrupt:
        print(
            "\ninterrupted; rerun the same command to resume from the last checkpoint",
            file=sys.stderr,
        )
        return 130
    return 0


def quiet_libraries() -> None:
    """Silences tfds' and orbax's informational logging (absl), which would bury the progress bar."""
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:
        pass
    logging.getLogger("absl").setLevel(logging.ERROR)


# ---------------------------------------------------------------------------- work dir and files


class Workdir:
    """The run's directory: ``metrics.jsonl``, ``summary.json``, plots and ``checkpoints/``.

    ``restart=True`` deletes a previous run's metrics, summary and checkpoints first. In a
    multi-process run every process opens the same directory (a file system they share) and saves
    checkpoints there; only the first (``primary``) writes the other files.
    """

    def __init__(self, path: str | os.PathLike, *, restart: bool = False):
        self.path = Path(path).expanduser()
        self.primary = jax.process_index() == 0
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / f".write-test-{jax.process_index()}"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            reason = e.strerror or type(e).__name__
            raise ExperimentError(
                f"cannot write to the work dir {str(path)!r} ({reason}); "
                "pass a directory you can write to with --workdir"
            ) from None
        if restart and self.primary:
            shutil.rmtree(self.path / CHECKPOINTS, ignore_errors=True)
            for name in (METRICS, SUMMARY):
                (self.path / name).unlink(missing_ok=True)
        sync_processes("workdir")  # the others look for checkpoints once they are gone
        self.metrics = MetricsLog(self.path / METRICS, write=self.primary)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def checkpoints(self, keep: int = 2) -> Checkpoints:
        return Checkpoints(self.path / CHECKPOINTS, keep=keep)


def write_json(path: Path, obj: Any) -> None:
    """Writes ``obj`` as indented JSON, atomically (a reader never sees half a file)."""
    write_text(path, json.dumps(obj, indent=2) + "\n")


def write_text(path: Path, text: str) -> None:
    """Replaces ``path`` by ``text`` atomically: a kill leaves the old file or the new one."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


class MetricsLog:
    """``metrics.jsonl``: one JSON object per evaluation, each a complete line of its own, appended
    and written to disk (fsync) as it happens (``write=False``: changes nothing, for the other
    processes of a multi-process run).

    A run killed while writing leaves at most a cut last line, which :meth:`keep_until` drops
    (with a warning) before anything is appended after it.
    """

    def __init__(self, path: Path, *, write: bool = True):
        self.path = path
        self.write = write

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        text = self.path.read_text(errors="replace")
        lines = text.splitlines()
        records = []
        for number, line in enumerate(lines, 1):
            try:
                records.append(json.loads(line))
            except ValueError:
                if number == len(lines) and not text.endswith("\n"):
                    print(f"warning: dropped the cut last line of {self.path}", file=sys.stderr)
                    break
                raise ExperimentError(
                    f"line {number} of {self.path} is not a JSON record; delete that line to "
                    "keep the run, or add --restart to start over"
                ) from None
        return records

    def keep_until(self, step: int) -> list[dict]:
        """Drops records written after ``step`` (by a run killed after its last checkpoint) and a
        cut last line, rewriting the file atomically."""
        kept = [r for r in self.records() if r["step"] <= step]
        if self.write:
            write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        return kept

    def append(self, record: dict) -> None:
        if not self.write:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


# ----------------------------------------------------------------------------------- checkpoints


class Checkpoints:
    """The last ``keep`` training states (any pytree of arrays), each with a JSON ``meta`` dict,
    via orbax.

    Saving is synchronous, so a run killed after ``save`` returns keeps that checkpoint. Each
    checkpoint holds the SHA-256 digest of each of its files (``sha256sums.json``, written
    last), checked before orbax reads any: a damaged checkpoint (or one a kill left without its
    digests) is deleted with a one-line warning and :meth:`meta` and :meth:`restore` fall back to
    the one before; where none is left, they end the run with one sentence (an
    :class:`ExperimentError`).
    """

    def __init__(self, directory: Path, *, keep: int = 2):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self._directory = directory.absolute()
        self._manager = ocp.CheckpointManager(
            self._directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=False
            ),
        )
        self._checked: set[int] = set()  # steps whose files match their digests
        self._damaged: list[str] = []  # "step N: reason" of each damaged checkpoint found

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def meta(self) -> dict | None:
        """The ``meta`` of the latest intact checkpoint (no arrays are read), or None where there
        is no checkpoint."""
        args = self._ocp.args.Composite(meta=self._ocp.args.JsonRestore())
        found = self._latest_intact(lambda step: self._manager.restore(step, args=args).meta)
        return None if found is None else found[1]

    def restore(self, like: Any) -> tuple[Any, dict]:
        """``(state, meta)`` of the latest intact checkpoint; ``state`` has the tree structure,
        shapes and dtypes of ``like``."""
        abstract = jax.tree.map(self._ocp.utils.to_shape_dtype_struct, like)
        args = self._ocp.args.Composite(
            state=self._ocp.args.StandardRestore(abstract), meta=self._ocp.args.JsonRestore()
        )
        found = self._latest_intact(lambda step: self._manager.restore(step, args=args))
        if found is None:
            raise ExperimentError(f"{self._directory} holds no checkpoint; add --restart")
        return found[1].state, found[1].meta

    def save(self, step: int, state: Any, meta: dict) -> None:
        args = self._ocp.args.Composite(
            state=self._ocp.args.StandardSave(state), meta=self._ocp.args.JsonSave(meta)
        )
        self._manager.save(step, args=args, force=True)
        self._manager.wait_until_finished()
        if jax.process_index() == 0:
            write_json(self._directory / str(step) / SUMS, _digests(self._directory / str(step)))
        sync_processes(f"checkpoint {step}")
        self._checked.add(step)

    def reached_preemption(self, counter: int) -> bool:
        """Whether every process of a multi-process run reached the step to stop at after a
        preemption notice (orbax's helper over JAX's preemption service; False with one)."""
        return self._manager.reached_preemption(counter)

    def close(self) -> None:
        self._manager.close()

    def _latest_intact(self, read: Callable[[int], Any]) -> tuple[int, Any] | None:
        """``(step, read(step))`` of the latest checkpoint whose files match their digests;
        deletes each later one, saying why. None where there is no checkpoint.

        Only files that match their digests reach orbax, so that a damaged file never meets it
        (it would raise anything from a JSON error to tensorstore's DATA_LOSS, or read flipped
        bytes without complaint), and an error it raises is a bug to show.
        """
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                self._check(step)
            except ValueError as e:
                reason = str(e)
            except OSError as e:
                raise ExperimentError(
                    f"cannot read the checkpoint of step {step} in {self._directory} "
                    f"({e.strerror or type(e).__name__}: {e.filename}); make it readable, or add "
                    "--restart to start over"
                ) from None
            else:
                return step, read(step)
            print(
                f"warning: the checkpoint of step {step} in {self._directory} is damaged "
                f"({reason}); deleted it, falling back to the one before",
                file=sys.stderr,
            )
            self._damaged.append(f"step {step}: {reason}")
            self._manager.delete(step)  # a later save may need its step
        if self._damaged:
            raise ExperimentError(
                f"no checkpoint in the work dir {self._directory.parent} can be restored "
                f"({'; '.join(self._damaged)}); add --restart to start over there, or pass "
                "another --workdir"
            )
        return None

    def _check(self, step: int) -> None:
        """Raises ValueError where a file of checkpoint ``step`` is missing, extra or changed."""
        if step in self._checked:
            return
        directory = self._directory / str(step)
        try:
            saved = json.loads((directory / SUMS).read_bytes())
        except FileNotFoundError:
            raise ValueError(f"it has no {SUMS}: the run stopped while saving it") from None
        except ValueError:
            raise ValueError(f"its {SUMS} is not JSON") from None
        found = _digests(directory)
        if saved != found:
            names = sorted(n for n in saved.keys() | found.keys() if saved.get(n) != found.get(n))
            raise ValueError(f"{', '.join(names)} do not match {SUMS}")
        self._checked.add(step)


SUMS = "sha256sums.json"  # in each checkpoint: {file name: SHA-256 digest of its bytes}


def _digests(directory: Path) -> dict[str, str]:
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file() and not path.name.startswith(SUMS)
    }


def check_same_config(saved: dict, config: Any, *, free: Sequence[str] = ()) -> None:
    """Refuses to resume a checkpoint written with other settings (``free`` fields may differ)."""
    current = dataclasses.asdict(config)
    for name, value in current.items():
        if name in free or name not in saved or saved[name] == value:
            continue
        flag = "--" + name.replace("_", "-")
        raise ExperimentError(
            f"the work dir holds a run with {flag} {saved[name]}, not {value}; rerun with the "
            "same flags to resume it, add --restart to start over, or pass another --workdir"
        )


def run_in_workdir(config: Any, train: Callable[[Any, Workdir, Checkpoints], Any]) -> Any:
    """``train(config, workdir, checkpoints)`` in ``config.workdir``, closing the checkpoints after;
    SIGTERM and SIGINT stop it at the next chunk of steps (:func:`preemption.catch_signals`)."""
    workdir = Workdir(config.workdir, restart=config.restart)
    checkpoints = workdir.checkpoints(config.keep_checkpoints)
    try:
        with preemption.catch_signals():
            return train(config, workdir, checkpoints)
    finally:
        checkpoints.close()


def saved_meta(checkpoints: Checkpoints, config: Any, *, free: Sequence[str] = ()) -> dict | None:
    """The latest checkpoint's ``meta`` (None for a new run), once its config matches ``config``."""
    meta = checkpoints.meta()
    if meta is not None:
        check_same_config(meta["config"], config, free=free)
    return meta


# --------------------------------------------------------------------------------------- devices

DATA = "data"  # the mesh axis that the batch is split along


def start_distributed(requested: bool = False) -> None:
    """Joins the other processes of a multi-process run (several hosts, or one process per GPU).

    Runs ``jax.distributed.initialize()`` with ``requested`` (``--distributed``: the cluster says
    who is who, on Cloud TPU, SLURM, Open MPI or Kubernetes) or when ``JAX_COORDINATOR_ADDRESS``
    is set, then with ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` where no cluster says them.
    Must come before anything touches a device; does nothing otherwise, or a second time.
    """
    env = os.environ
    if jax.distributed.is_initialized() or not (requested or "JAX_COORDINATOR_ADDRESS" in env):
        return
    kwargs = {}
    for arg, name in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
        if name in env:
            try:
                kwargs[arg] = int(env[name])
            except ValueError:
                raise ExperimentError(f"{name} must be an integer, not {env[name]!r}") from None
    try:
        jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ExperimentError(
            f"jax.distributed.initialize() failed ({reason}); launch one process per host with "
            "JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID set, or "
            "--distributed under SLURM, Open MPI or on a Cloud TPU pod"
        ) from None


def sync_processes(name: str) -> None:
    """Waits until every process of a multi-process run has got here (nothing with one)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def data_mesh(devices: int = 0) -> Mesh:
    """A 1-D mesh with axis ``"data"`` over ``devices`` devices (0: every device of every process).

    In a multi-process run each process gives ``devices / process_count`` of its own devices.
    """
    available = jax.devices()
    n = devices or len(available)
    kind = available[0].platform
    if n > len(available):
        raise ExperimentError(
            f"--devices {n}, but only {len(available)} {kind} devices are visible"
        )
    processes = jax.process_count()
    if n % processes:
        raise ExperimentError(
            f"--devices {n} does not split evenly over the {processes} processes of this run"
        )
    chosen = [
        device
        for process in range(processes)
        for device in [d for d in available if d.process_index == process][: n // processes]
    ]
    return Mesh(np.array(chosen), (DATA,))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    if batch_size % mesh.size:
        raise ExperimentError(
            f"--batch-size {batch_size} does not split evenly over {mesh.size} devices; pass a "
            f"multiple of {mesh.size}, or --devices N with N dividing {batch_size}"
        )


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds all of it (parameters, optimizer state, metrics)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """For ``(steps, batch, ...)`` arrays: each device holds its slice of every batch."""
    return NamedSharding(mesh, PartitionSpec(None, DATA))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """``tree`` (the same on every process) on every device of ``mesh``."""
    sharding = replicated(mesh)

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree)


def shard_batches(mesh: Mesh, indices: np.ndarray, *arrays: np.ndarray) -> list[jax.Array]:
    """``array[indices]`` of each host array, ``(steps, batch, ...)``, the batch split over the
    devices of ``mesh``: each process reads only the examples its own devices hold.

    ``indices`` is ``(steps, batch)``, the example indices of each step's batch.
    """
    sharding = batch_sharded(mesh)

    def gather(array: np.ndarray) -> jax.Array:
        shape = indices.shape + array.shape[1:]
        return jax.make_array_from_callback(
            shape, sharding, lambda index: array[indices[index[:2]]]
        )

    return [gather(array) for array in arrays]


def eval_batches(mesh: Mesh, batch: int, x: np.ndarray, labels: np.ndarray) -> list[jax.Array]:
    """A test set as ``(batches, batch, ...)`` device arrays, the batch split over ``mesh``
    (``batch`` rounded up to a multiple of its size); padded examples carry label -1."""
    batch = -(-batch // mesh.size) * mesh.size
    x, labels = pad_to_batches(x, labels, batch)
    return shard_batches(mesh, np.arange(len(labels)).reshape(-1, batch), x, labels)


# ------------------------------------------------------------------------------------------ data


def tfds_source(
    name: str,
    split: str,
    data_dir: str | None,
    *,
    check: Callable[[Any], str | None],
    alternatives: str,
    hint: str = "",
):
    """tfds' random-access data source of a prepared dataset (ArrayRecord; no TensorFlow needed).

    ``check(features)`` returns why the dataset does not fit the program ("has images of shape
    ...", after "--dataset NAME"), or None;
    ``alternatives`` ends the unknown-name error ("pass --dataset mnist, ..."); ``hint`` is added
    to the advice on where prepared data may be.
    """
    import tensorflow_datasets as tfds

    try:  # the builder knows the features before any data is there
        features = tfds.builder(name, data_dir=data_dir).info.features
    except tfds.core.registered.DatasetNotFoundError:
        raise ExperimentError(f"tfds has no dataset named {name!r}; {alternatives}") from None
    problem = check(features)
    if problem:
        raise ExperimentError(f"--dataset {name} {problem}")
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception:  # not prepared in data_dir (tfds raises several kinds): prepare it
        pass
    where = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    hint = "point --data-dir (or TFDS_DATA_DIR) at a directory where it is prepared" + hint
    if importlib.util.find_spec("tensorflow") is None:
        raise ExperimentError(
            f"tfds found no prepared {name!r} in {where}, and preparing it needs TensorFlow "
            f"(pip install 'jlstm[prepare]') and internet; or {hint}"
        )
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=True)
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ExperimentError(
            f"tfds could not download and prepare {name!r} in {where} ({reason}); "
            f"without internet, {hint}"
        ) from None


def read_all(source) -> list[dict]:
    """Every example of a tfds data source, as a list of feature dicts."""
    try:
        return source.__getitems__(range(len(source)))  # one batched read
    except TypeError:  # tfds.testing.mock_data's source lacks a working __getitems__
        return [source[i] for i in range(len(source))]


def pad_to_batches(x: np.ndarray, labels: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``x`` padded with zeros and ``labels`` with -1 to a multiple of ``size`` examples."""
    pad = -len(labels) % size
    x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
    return x, np.concatenate([labels, np.full(pad, -1, labels.dtype)])


def epoch_batches(key: jax.Array, epoch: int, n: int, steps: int, batch_size: int) -> np.ndarray:
    """An epoch's shuffled example indices, ``(steps, batch_size)``; the same on every process."""
    order = np.asarray(jax.random.permutation(jax.random.fold_in(key, epoch), n))
    return order[: steps * batch_size].reshape(steps, batch_size)


# ------------------------------------------------------------------------------------ training


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
    from :func:`saved_meta`), dropping metrics written after it."""
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
    (:func:`shard_batches`); step ``i`` of the chunk gets ``batch = tuple(a[start + i] for a in
    epoch)`` and ``fold_in(key, i)`` (None where ``key`` is None). The scan always has ``chunk``
    iterations, those past ``n`` do nothing (metrics 0), so one compilation serves every chunk.
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
    the batch split over ``mesh`` (:func:`eval_batches`); examples labelled -1 count for nothing.
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


def device_name(mesh: Mesh | None = None) -> str:
    """``"cpu:cpu"``, or ``"8 x gpu:NVIDIA H100"`` for a mesh of several devices."""
    devices = mesh.devices.ravel() if mesh is not None else jax.devices()[:1]
    name = f"{devices[0].platform}:{devices[0].device_kind}"
    return f"{len(devices)} x {name}" if len(devices) > 1 else name


# ---------------------------------------------------------------------------------------- plots


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(
    path: Path,
    records: list[dict],
    panels: Sequence[tuple[str | tuple[str, ...], str, str]],
    *,
    title: str = "",
) -> None:
    """One panel per ``(keys, label, scale)``, each key against ``step`` (a legend where a panel
    has several); scale: ``"linear"``, ``"log"`` or ``"percent"``."""
    plt = pyplot()
    from matplotlib.ticker import PercentFormatter

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), squeeze=False)
    for ax, (keys, label, scale) in zip(axes[0], panels, strict=True):
        keys = (keys,) if isinstance(keys, str) else keys
        for key in keys:
            points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            if points:
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, marker="o", markersize=3, label=key.replace("_", " "))
        if len(keys) > 1:
            ax.legend(fontsize=8)
        if scale == "log":
            ax.set_yscale("log")
        elif scale == "percent":
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.set_xlabel("training step")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
