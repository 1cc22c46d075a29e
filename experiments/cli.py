"""Command-line flags from a config dataclass, the flags every program shares, and ``main``.

A program declares its config as a frozen dataclass whose fields are made with :func:`option` (or
:func:`shared`, for a flag that means the same in every program), and runs as
``sys.exit(cli.main(train, Config, argv, __doc__))``: flags come from the fields, an
:class:`ExperimentError` ends the run with one line on stderr instead of a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import shlex
import sys
from collections.abc import Callable, Sequence
from typing import Any

from experiments import preemption


class ExperimentError(Exception):
    """A problem the user can fix; ``main`` prints its message as one line, without a traceback."""


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


def fraction(text: str) -> float:
    value = nonnegative_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
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


# Flags that mean the same in every program that has them, each declared once, here.
SHARED: dict[str, dict[str, Any]] = {
    "data_dir": dict(default=None, help="where tfds looks for prepared data "
                     "(default: $TFDS_DATA_DIR, else ~/tensorflow_datasets)"),
    "schedule": dict(default="cosine", help="learning rate schedule: 'cosine' warms up over 5 %% "
                     "of the steps then decays to 0; 'constant' keeps --lr",
                     choices=("cosine", "constant")),
    "grad_clip": dict(default=1.0, help="clip gradients to this global norm (0: no clipping)",
                      type=nonnegative_float),
    "eval_every": dict(default=0, help="also evaluate every N steps (0: after each epoch only)",
                       type=nonnegative_int),
    "restart": dict(default=False, help="delete the work dir's checkpoints and metrics, "
                    "start over"),
    "keep_checkpoints": dict(default=2, help="checkpoints kept, the latest ones (an earlier one "
                             "is the fallback where the latest is damaged)", type=positive_int),
    "devices": dict(default=0, help="devices to split each batch over, data-parallel "
                    "(0: all visible)", type=nonnegative_int),
    "distributed": dict(default=False, help="join a multi-host run: jax.distributed.initialize() "
                        "(also done when JAX_COORDINATOR_ADDRESS is set)"),
}  # fmt: skip

# Flags that may change between a run and its resumption (where a program has them).
RESUMABLE_CHANGES = ("data_dir", "eval_every", "workdir", "restart", "keep_checkpoints",
                     "devices", "distributed")  # fmt: skip


def shared(name: str) -> Any:
    """The config field of the shared flag ``name`` (a key of :data:`SHARED`).

    >>> import dataclasses
    >>> @dataclasses.dataclass(frozen=True)
    ... class Config:
    ...     keep_checkpoints: int = shared("keep_checkpoints")
    >>> parse_config(Config, ["--keep-checkpoints", "3"])
    Config(keep_checkpoints=3)
    """
    return option(**SHARED[name])


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
