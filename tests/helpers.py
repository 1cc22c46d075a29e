"""Helpers shared by the training programs' tests (test_experiments, test_sentiment)."""

import json
import os

from experiments import plots, training, workdir


def read_metrics(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def without_seconds(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def assert_png(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    image = plots.pyplot().imread(path)
    assert image.ndim == 3 and min(image.shape[:2]) > 100


def interrupt_after_first_checkpoint(monkeypatch):
    """Makes the next run die (as if by Ctrl-C) right after it saved its first checkpoint."""
    save = workdir.Checkpoints.save

    def save_then_interrupt(self, *args, **kwargs):
        save(self, *args, **kwargs)
        monkeypatch.setattr(workdir.Checkpoints, "save", save)
        raise KeyboardInterrupt

    monkeypatch.setattr(workdir.Checkpoints, "save", save_then_interrupt)


def signal_after_chunks(monkeypatch, chunks, *signums):
    """Makes the next run send itself ``signums`` (real signals, to its own process) once it has
    taken ``chunks`` chunks of training steps: when its progress bar moves for the ``chunks``-th
    time, so that the signal arrives in the middle of the loop, before the loop checks for one."""
    progress = training.progress
    moves = 0

    def signalling_progress(*args, **kwargs):
        bar = progress(*args, **kwargs)
        update = bar.update

        def update_then_signal(n=1):
            nonlocal moves
            update(n)
            moves += 1
            if moves == chunks:
                monkeypatch.setattr(training, "progress", progress)
                for signum in signums:
                    os.kill(os.getpid(), signum)

        bar.update = update_then_signal
        return bar

    monkeypatch.setattr(training, "progress", signalling_progress)
