"""Smoke tests of the training programs: tiny runs that check every output, resume and errors.

MNIST runs on ``tfds.testing.mock_data`` (random images), so no dataset is needed.
"""

import importlib.util
import json
import math

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")
pytest.importorskip("optax")
pytest.importorskip("orbax.checkpoint")

from helpers import (  # noqa: E402
    assert_png,
    interrupt_after_first_checkpoint,
    read_metrics,
    without_seconds,
)

from experiments import cli, mnist, regression  # noqa: E402
from experiments.workdir import Checkpoints  # noqa: E402

TINY_MNIST = ["--hidden-size", "8", "--epochs", "2", "--batch-size", "16", "--eval-every", "3"]
TINY_REGRESSION = ["--steps", "20", "--eval-every", "5", "--hidden-size", "4"]


def run_mnist(workdir, *flags, num_examples=64):
    with tfds.testing.mock_data(num_examples=num_examples):
        return cli.main(mnist.train, mnist.Config, [*TINY_MNIST, "--workdir", str(workdir), *flags])


def run_regression(workdir, *flags):
    argv = [*TINY_REGRESSION, "--workdir", str(workdir), *flags]
    return cli.main(regression.train, regression.Config, argv)


def test_mnist_writes_every_output(tmp_path):
    assert run_mnist(tmp_path) == 0

    records = read_metrics(tmp_path)  # 64 examples / 16 = 4 steps per epoch; eval every 3
    assert [r["step"] for r in records] == [3, 4, 6, 8]
    assert [r["epoch"] for r in records] == [0.75, 1.0, 1.5, 2.0]
    for r in records:
        assert set(r) == {"epoch", "step", "train_loss", "test_loss", "test_accuracy", "seconds"}
        assert 0 <= r["test_accuracy"] <= 1 and math.isfinite(r["train_loss"])

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["test_accuracy"] == records[-1]["test_accuracy"]
    assert summary["epochs"] == 2 and summary["steps"] == 8
    assert summary["train_seconds"] > 0 and summary["examples_per_second"] > 0
    assert summary["config"]["hidden_size"] == 8
    assert_png(tmp_path / "curves.png")
    assert_png(tmp_path / "predictions.png")
    assert Checkpoints(tmp_path / "checkpoints").latest_step() == 8


def test_mnist_resume_continues_from_checkpoint(tmp_path, monkeypatch, capsys):
    assert run_mnist(tmp_path / "straight") == 0

    interrupt_after_first_checkpoint(monkeypatch)
    assert run_mnist(tmp_path / "resumed") == 130
    assert "rerun the same command to resume" in capsys.readouterr().err
    assert [r["step"] for r in read_metrics(tmp_path / "resumed")] == [3, 4]
    assert run_mnist(tmp_path / "resumed") == 0
    assert "resuming" in capsys.readouterr().out

    # Same flags and seed: the resumed run's metrics equal the uninterrupted run's.
    expected = without_seconds(read_metrics(tmp_path / "straight"))
    assert without_seconds(read_metrics(tmp_path / "resumed")) == expected

    # A finished run, rerun, trains nothing.
    assert run_mnist(tmp_path / "resumed") == 0
    assert "already finished" in capsys.readouterr().out
    assert without_seconds(read_metrics(tmp_path / "resumed")) == expected


def test_regression_writes_every_output(tmp_path):
    assert run_regression(tmp_path) == 0

    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [5, 10, 15, 20]
    for r in records:
        assert set(r) == {"step", "train_loss", "eval_mse", "seconds"}
        assert math.isfinite(r["eval_mse"]) and r["eval_mse"] >= 0

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["eval_mse"] == records[-1]["eval_mse"]
    assert summary["steps"] == 20 and summary["config"]["cell"] == "lstm"
    assert_png(tmp_path / "prediction.png")
    assert_png(tmp_path / "curves.png")
    assert Checkpoints(tmp_path / "checkpoints").latest_step() == 20


@pytest.mark.parametrize("cell", ["gru", "rnn"])
def test_regression_cells(tmp_path, cell):
    assert run_regression(tmp_path, "--cell", cell) == 0
    assert json.loads((tmp_path / "summary.json").read_text())["config"]["cell"] == cell


def test_regression_resume_continues_from_checkpoint(tmp_path, monkeypatch, capsys):
    assert run_regression(tmp_path / "straight") == 0
    interrupt_after_first_checkpoint(monkeypatch)
    assert run_regression(tmp_path / "resumed") == 130
    assert run_regression(tmp_path / "resumed") == 0
    expected = without_seconds(read_metrics(tmp_path / "straight"))
    assert without_seconds(read_metrics(tmp_path / "resumed")) == expected

    # --restart starts over: the same metrics again, from step 0.
    capsys.readouterr()
    assert run_regression(tmp_path / "resumed", "--restart") == 0
    assert "resuming" not in capsys.readouterr().out
    assert without_seconds(read_metrics(tmp_path / "resumed")) == expected


def test_segments_tile_the_time_axis():
    t, x, y = regression.segments(3, 2)
    assert t.shape == x.shape == y.shape == (2, 10)
    np.testing.assert_allclose(t.ravel(), np.pi * (3 + np.arange(20) / 10))
    np.testing.assert_allclose(x, np.sin(t), atol=1e-6)
    np.testing.assert_allclose(y, np.cos(t), atol=1e-6)


# ------------------------------------------------------------------------------- error paths


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--epochs", "0"], "argument --epochs: must be a positive integer, got 0"),
        (["--lr", "fast"], "argument --lr: must be a positive number, got 'fast'"),
        (["--cell", "tcn"], "argument --cell: invalid choice: 'tcn'"),
    ],
)
def test_bad_flag_is_one_clear_line(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(mnist.train, mnist.Config, flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_unwritable_workdir(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert run_regression(blocker / "run") == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write to the work dir") and "--workdir" in err
    assert err.count("\n") == 1  # one line, no traceback


def test_resume_with_other_flags_refuses(tmp_path, capsys):
    assert run_regression(tmp_path) == 0
    assert run_regression(tmp_path, "--hidden-size", "5") == 1
    err = capsys.readouterr().err
    assert "--hidden-size 4, not 5" in err and "--restart" in err


def test_unknown_dataset(tmp_path, capsys):
    argv = [
        "--dataset",
        "no_such_dataset",
        "--data-dir",
        str(tmp_path / "d"),
        "--workdir",
        str(tmp_path),
    ]
    assert cli.main(mnist.train, mnist.Config, argv) == 1
    assert "tfds has no dataset named 'no_such_dataset'" in capsys.readouterr().err


@pytest.mark.skipif(
    importlib.util.find_spec("tensorflow") is not None,
    reason="with TensorFlow installed, tfds would try to download and prepare the dataset",
)
def test_missing_dataset_says_how_to_point_at_prepared_data(tmp_path, capsys):
    argv = ["--data-dir", str(tmp_path / "empty"), "--workdir", str(tmp_path / "run")]
    assert cli.main(mnist.train, mnist.Config, argv) == 1
    err = capsys.readouterr().err
    assert f"tfds found no prepared 'mnist' in {tmp_path / 'empty'}" in err
    assert "--data-dir" in err and err.count("\n") == 1


def test_dataset_of_other_shape_is_refused(tmp_path, capsys):
    argv = ["--dataset", "cifar10", "--workdir", str(tmp_path)]
    with tfds.testing.mock_data(num_examples=4):
        assert cli.main(mnist.train, mnist.Config, argv) == 1
    assert "has images of shape (32, 32, 3) in 10 classes" in capsys.readouterr().err
