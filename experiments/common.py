"""What every training program here shares: flags, the work dir, metrics, checkpoints, plots.

A program declares its config as a frozen dataclass whose fields are made with :func:`option`,
and runs as ``sys.exit(common.main(train, Config, argv, __doc__))``: flags come from the fields,
an :class:`ExperimentError` ends the run with one line on stderr instead of a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import optax

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
    """Parses flags, runs ``train(config)`` and turns user errors into one line and exit code 1."""
    config = parse_config(config_cls, argv, description, prog)
    quiet_libraries()
    try:
        train(config)
    except ExperimentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
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

    ``restart=True`` deletes a previous run's metrics, summary and checkpoints first.
    """

    def __init__(self, path: str | os.PathLike, *, restart: bool = False):
        self.path = Path(path).expanduser()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            reason = e.strerror or type(e).__name__
            raise ExperimentError(
                f"cannot write to the work dir {str(path)!r} ({reason}); "
                "pass a directory you can write to with --workdir"
            ) from None
        if restart:
            shutil.rmtree(self.path / CHECKPOINTS, ignore_errors=True)
            for name in (METRICS, SUMMARY):
                (self.path / name).unlink(missing_ok=True)
        self.metrics = MetricsLog(self.path / METRICS)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def checkpoints(self) -> Checkpoints:
        return Checkpoints(self.path / CHECKPOINTS)


def write_json(path: Path, obj: Any) -> None:
    """Writes ``obj`` as indented JSON, atomically (a reader never sees half a file)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


class MetricsLog:
    """``metrics.jsonl``: one JSON object per evaluation, appended and flushed as it happens."""

    def __init__(self, path: Path):
        self.path = path

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def keep_until(self, step: int) -> list[dict]:
        """Drops records written after ``step`` (by a run killed after its last checkpoint)."""
        kept = [r for r in self.records() if r["step"] <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        return kept

    def append(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------------- checkpoints


class Checkpoints:
    """The latest training state (any pytree of arrays) and a JSON ``meta`` dict, via orbax.

    Saving is synchronous, so a run killed after ``save`` returns keeps that checkpoint.
    """

    def __init__(self, directory: Path):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self._manager = ocp.CheckpointManager(
            directory.absolute(),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=1, create=True, enable_async_checkpointing=False
            ),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def meta(self) -> dict | None:
        """The latest checkpoint's ``meta`` (cheap: no arrays are read), or None."""
        step = self.latest_step()
        if step is None:
            return None
        args = self._ocp.args.Composite(meta=self._ocp.args.JsonRestore())
        return self._manager.restore(step, args=args).meta

    def restore(self, like: Any) -> Any:
        """The latest state, with the tree structure, shapes and dtypes of ``like``."""
        abstract = jax.tree.map(self._ocp.utils.to_shape_dtype_struct, like)
        args = self._ocp.args.Composite(state=self._ocp.args.StandardRestore(abstract))
        return self._manager.restore(self.latest_step(), args=args).state

    def save(self, step: int, state: Any, meta: dict) -> None:
        args = self._ocp.args.Composite(
            state=self._ocp.args.StandardSave(state), meta=self._ocp.args.JsonSave(meta)
        )
        self._manager.save(step, args=args, force=True)
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


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


# ------------------------------------------------------------------------------------ training


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
    """A tqdm bar (on stderr) for ``total`` units; ``unit_scale=True`` shows 12.3k ex/s."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        unit_scale=unit_scale,
        dynamic_ncols=True,
        smoothing=0.1,
    )


def device_name() -> str:
    device = jax.devices()[0]
    return f"{device.platform}:{device.device_kind}"


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
