"""Stopping a training run cleanly on SIGTERM (preemption) or SIGINT (Ctrl-C).

Cloud spot machines and cluster schedulers (SLURM, Kubernetes) send SIGTERM and kill the program
a grace period later. While :func:`catch_signals` is active, the first SIGTERM or SIGINT only
marks the run: the training loop finishes the chunk of steps it is in, saves a checkpoint there
and raises :class:`Stopped`, which ``main`` turns into one line and exit code 128 + the signal
(143, 130). A second signal stops the program at once (the handlers are then the default ones).

In a multi-process run every process must stop after the same step. There SIGTERM is left to
JAX's preemption service (``jax.distributed.initialize`` starts it, and it catches SIGTERM): it
tells every process, and :func:`stop_signal`, called after each chunk with a counter that rises
by one per chunk, returns the signal once all of them reach the step it chose
(``CheckpointManager.reached_preemption``, i.e.
``jax.experimental.multihost_utils.reached_preemption_sync_point``). A SIGINT is passed on to it
as a SIGTERM to the process itself.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator

import jax

_received: int | None = None  # the first signal caught while catch_signals is active
_caught: tuple[int, ...] = ()  # the signals whose handlers catch_signals installed


class Stopped(Exception):
    """Raised by a training loop that stopped at ``step``, after saving its checkpoint there,
    because of the signal ``signum``.

    >>> str(Stopped(1200, 15))
    'stopped by SIGTERM at step 1200'
    """

    def __init__(self, step: int, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}")
        self.step = step
        self.signum = signum


@contextlib.contextmanager
def catch_signals() -> Iterator[None]:
    """Installs the handlers for the duration of a run (from the main thread; elsewhere Python
    cannot install any, and signals act as usual).

    >>> import os, signal
    >>> with catch_signals():
    ...     os.kill(os.getpid(), signal.SIGTERM)  # noted, not acted upon
    ...     stop_signal(None, 0) == signal.SIGTERM
    True
    """
    global _received, _caught
    _received = None
    if jax.process_count() > 1:
        handlers = {signal.SIGINT: _pass_to_preemption_service}
    else:
        handlers = {signal.SIGINT: _note, signal.SIGTERM: _note}
    try:
        previous = {signum: signal.signal(signum, handler) for signum, handler in handlers.items()}
    except ValueError:  # not the main thread
        yield
        return
    _caught = tuple(handlers)
    try:
        yield
    finally:
        _caught = ()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def stop_signal(checkpoints, counter: int) -> int | None:
    """The signal to stop for, once every process should stop after this chunk, else None.

    ``counter`` rises by one per chunk of training steps (0, 1, 2 ... in this process), the same
    on every process of the run.
    """
    if jax.process_count() == 1:
        return _received
    if checkpoints.reached_preemption(counter):
        return _received or signal.SIGTERM
    return None


def _note(signum: int, frame) -> None:
    global _received
    _received = signum
    for caught in _caught:
        signal.signal(caught, signal.SIG_DFL)  # a second signal stops the program at once


def _pass_to_preemption_service(signum: int, frame) -> None:
    _note(signum, frame)
    os.kill(os.getpid(), signal.SIGTERM)  # caught by JAX's preemption service, not by SIG_DFL
