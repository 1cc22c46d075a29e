"""The work dir of a run: its metrics (JSON lines), summary, plots and orbax checkpoints."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax

from experiments import preemption
from experiments.cli import ExperimentError
from experiments.mesh import sync_processes

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"


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
    """Replaces ``path`` by ``text`` atomically: a kill leaves the old file or the new one.

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "a.txt"
    >>> write_text(path, "one\\n")
    >>> path.read_text()
    'one\\n'
    """
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
                    if self.write:  # (one warning per run, not per process)
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
    digests) is moved to ``damaged-<step>`` with a one-line warning and :meth:`meta` and
    :meth:`restore` fall back to the one before; where none is left, they end the run with one
    sentence (an :class:`ExperimentError`).
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
        """``(step, read(step))`` of the latest checkpoint whose files match their digests; sets
        each later one aside, saying why. None where there is no checkpoint.

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
            self._set_aside(step, reason)
        if self._damaged:
            raise ExperimentError(
                f"no checkpoint in the work dir {self._directory.parent} can be restored "
                f"({'; '.join(self._damaged)}); add --restart to start over there, or pass "
                "another --workdir"
            )
        return None

    def _set_aside(self, step: int, reason: str) -> None:
        """Moves damaged checkpoint ``step`` to ``damaged-<step>`` (out of orbax's sight, and out
        of the way of a later save at that step), saying so."""
        aside = self._directory / f"damaged-{step}"
        if jax.process_index() == 0:  # (every process finds the same damage)
            print(
                f"warning: the checkpoint of step {step} in {self._directory} is damaged "
                f"({reason}); moved it to {aside.name}, falling back to the one before",
                file=sys.stderr,
            )
            shutil.rmtree(aside, ignore_errors=True)
            (self._directory / str(step)).rename(aside)
        sync_processes(f"damaged checkpoint {step}")
        self._manager.reload()
        self._damaged.append(f"step {step}: {reason}")

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
