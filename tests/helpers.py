"""Helpers shared by the training programs' tests (test_experiments, test_sentiment)."""

import json

from experiments import common


def read_metrics(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def without_seconds(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def assert_png(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    image = common.pyplot().imread(path)
    assert image.ndim == 3 and min(image.shape[:2]) > 100


def interrupt_after_first_checkpoint(monkeypatch):
    """Makes the next run die (as if by Ctrl-C) right after it saved its first checkpoint."""
    save = common.Checkpoints.save

    def save_then_interrupt(self, *args, **kwargs):
        save(self, *args, **kwargs)
        monkeypatch.setattr(common.Checkpoints, "save", save)
        raise KeyboardInterrupt

    monkeypatch.setattr(common.Checkpoints, "save", save_then_interrupt)
