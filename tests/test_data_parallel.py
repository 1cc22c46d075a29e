"""Data-parallel training on 8 CPU devices: the same loss curve as on one device with the same
global batch (MNIST, and IMDB sentiment with dropout), and each batch really split over the 8
devices.

``XLA_FLAGS=--xla_force_host_platform_device_count=8`` only works if it is set before JAX starts,
so the runs happen in a fresh Python process (``CHILD``), which prints its findings as JSON.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow_datasets")
pytest.importorskip("optax")
pytest.importorskip("orbax.checkpoint")

from experiments import cli, mnist  # noqa: E402
from experiments.workdir import Checkpoints  # noqa: E402

ROOT = Path(__file__).parent.parent
DEVICES = 8

CHILD = r"""
import contextlib, io, json, sys
import jax
import tensorflow_datasets as tfds
from experiments import cli, input_pipeline, mnist, sentiment

def shards(sharding, shape):
    # How many distinct pieces the devices hold: 1 if replicated, 8 if split 8 ways.
    pieces = sharding.devices_indices_map(tuple(shape)).values()
    return len({tuple((s.start, s.stop) for s in index) for index in pieces})

inside = []  # (shape, pieces) of the images that reach the model, in training and evaluation
original_logits_fn = mnist.logits_fn
def logits_fn(config, params, images):
    jax.debug.inspect_array_sharding(
        images, callback=lambda s, shape=images.shape: inside.append((shape, shards(s, shape))))
    return original_logits_fn(config, params, images)
mnist.logits_fn = logits_fn

around = []  # the epoch arrays handed to the jitted chunks of steps
original_shard_batches = input_pipeline.shard_batches
def shard_batches(*args):
    arrays = original_shard_batches(*args)
    around.extend((a.shape, shards(a.sharding, a.shape), len(a.sharding.device_set)) for a in arrays)
    return arrays
input_pipeline.shard_batches = shard_batches

workdir, flags, sentiment_flags = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
results = {"device_count": jax.device_count()}
with tfds.testing.mock_data(num_examples=64):
    for devices in ("8", "1"):
        argv = [*sentiment_flags, "--devices", devices, "--workdir", f"{workdir}/imdb{devices}"]
        assert cli.main(sentiment.train, sentiment.Config, argv) == 0
    inside.clear()
    around.clear()
    for devices in ("8", "1", "3"):
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            argv = [*flags, "--devices", devices, "--workdir", f"{workdir}/{devices}"]
            code = cli.main(mnist.train, mnist.Config, argv)
        results[devices] = {"code": code, "stderr": stderr.getvalue(), "inside": inside[:],
                            "around": around[:]}
        inside.clear()
        around.clear()
print(json.dumps(results))
"""

FLAGS = ["--hidden-size", "8", "--epochs", "2", "--batch-size", "16", "--eval-every", "3"]
SENTIMENT_FLAGS = ["--hidden-size", "8", "--embed-dim", "8", "--max-len", "16", "--vocab-size",
                   "64", "--epochs", "1", "--batch-size", "16", "--eval-every", "2"]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The child's findings for ``--devices 8``, ``1`` and ``3`` (16 is not a multiple of 3)."""
    workdir = tmp_path_factory.mktemp("dp")
    env = os.environ | {
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES}",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(workdir), json.dumps(FLAGS), json.dumps(SENTIMENT_FLAGS)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    return workdir, json.loads(child.stdout.splitlines()[-1])


def metrics(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_eight_devices_give_the_one_device_loss_curve(runs):
    workdir, found = runs
    assert found["device_count"] == DEVICES
    assert found["8"]["code"] == found["1"]["code"] == 0
    eight, one = metrics(workdir / "8"), metrics(workdir / "1")
    assert [r["step"] for r in eight] == [r["step"] for r in one] == [3, 4, 6, 8]
    for key in ("train_loss", "test_loss", "test_accuracy"):
        np.testing.assert_allclose(
            [r[key] for r in eight], [r[key] for r in one], rtol=1e-5, err_msg=key
        )
    # Not trivially equal: the parameters moved.
    assert eight[0]["train_loss"] != eight[-1]["train_loss"]
    summaries = [json.loads((workdir / d / "summary.json").read_text()) for d in ("8", "1")]
    assert [s["device"] for s in summaries] == ["8 x cpu:cpu", "cpu:cpu"]


def test_sentiment_with_dropout_gives_the_one_device_curve(runs):
    # Dropout masks do not depend on how the batch is split (jax_threefry_partitionable).
    workdir, _ = runs
    eight, one = metrics(workdir / "imdb8"), metrics(workdir / "imdb1")
    assert [r["step"] for r in eight] == [r["step"] for r in one] == [2, 4]
    for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
        np.testing.assert_allclose(
            [r[key] for r in eight], [r[key] for r in one], rtol=1e-5, err_msg=key
        )


def test_each_batch_is_split_over_the_devices(runs):
    _, found = runs
    # Around the step: every epoch's (steps, batch, 28, 28) images and (steps, batch) labels
    # lie on 8 devices, each holding a different slice of every batch.
    around = found["8"]["around"]
    assert len(around) == 2 * 2 + 2  # test images and labels, then images and labels per epoch
    for shape, pieces, devices in around:
        assert devices == DEVICES and pieces == DEVICES, (shape, pieces, devices)
    assert [4, 16, 28, 28] in [shape for shape, _, _ in around]
    # Inside the step: the model sees the (16, 28, 28) batch in 8 pieces (2 images each), and
    # the evaluation its (1000, 28, 28) batches likewise.
    inside = {tuple(shape): pieces for shape, pieces in found["8"]["inside"]}
    assert inside == {(16, 28, 28): DEVICES, (1000, 28, 28): DEVICES}
    assert {tuple(shape): pieces for shape, pieces in found["1"]["inside"]} == {
        (16, 28, 28): 1,
        (1000, 28, 28): 1,
    }


def test_batch_that_does_not_split_is_one_clear_line(runs):
    _, found = runs
    assert found["3"]["code"] == 1
    assert found["3"]["stderr"] == (
        "error: --batch-size 16 does not split evenly over 3 devices; pass a multiple of 3, "
        "or --devices N with N dividing 16\n"
    )


def test_more_devices_than_visible(tmp_path, capsys):
    argv = ["--devices", "64", "--workdir", str(tmp_path)]
    assert cli.main(mnist.train, mnist.Config, argv) == 1
    assert "error: --devices 64, but only 1 " in capsys.readouterr().err


MULTIPROCESS_CHILD = r"""
import json, sys
import tensorflow_datasets as tfds
from experiments import cli, mnist
with tfds.testing.mock_data(num_examples=64):
    sys.exit(cli.main(mnist.train, mnist.Config, json.loads(sys.argv[1])))
"""


multiprocess = pytest.mark.skipif(
    not os.environ.get("JLSTM_MULTIPROCESS"),
    reason="two JAX processes take ~30 s; set JLSTM_MULTIPROCESS=1 to run",
)


def two_processes(flags):
    """What a 2-host launch does, on this machine: jax.distributed over localhost, 4 CPU devices
    each, one shared work dir; the two ``Popen``s of ``MULTIPROCESS_CHILD``."""
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = os.environ | {
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "JAX_PLATFORMS": "cpu",
        "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
        "JAX_NUM_PROCESSES": "2",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    return [
        subprocess.Popen(
            [sys.executable, "-c", MULTIPROCESS_CHILD, json.dumps(flags)],
            env=env | {"JAX_PROCESS_ID": str(i)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]


@multiprocess
def test_two_processes_of_four_devices_give_the_one_device_curve(runs, tmp_path):
    children = two_processes([*FLAGS, "--workdir", str(tmp_path)])
    outputs = [child.communicate(timeout=600) for child in children]
    for child, (_, err) in zip(children, outputs, strict=True):
        assert child.returncode == 0, err[-3000:]
    assert "on 8 x cpu:cpu" in outputs[0][0]
    workdir, _ = runs
    two, one = metrics(tmp_path), metrics(workdir / "1")
    assert [r["step"] for r in two] == [r["step"] for r in one]
    for key in ("train_loss", "test_loss", "test_accuracy"):
        np.testing.assert_allclose(
            [r[key] for r in two], [r[key] for r in one], rtol=1e-5, err_msg=key
        )
    assert json.loads((tmp_path / "summary.json").read_text())["processes"] == 2


@multiprocess
def test_sigterm_to_one_process_stops_both_after_the_same_step(tmp_path):
    # A preemption notice reaches one host; JAX's preemption service has both stop after the
    # same chunk of steps and save the checkpoint there together.
    import signal
    import time

    flags = ["--hidden-size", "8", "--epochs", "40", "--batch-size", "16", "--eval-every", "3"]
    children = two_processes([*flags, "--workdir", str(tmp_path)])
    deadline = time.monotonic() + 300
    while not (tmp_path / "checkpoints" / "4").exists():  # the end of epoch 1: training runs
        assert time.monotonic() < deadline and children[0].poll() is None
        time.sleep(0.2)
    children[1].send_signal(signal.SIGTERM)
    outputs = [child.communicate(timeout=300) for child in children]
    lasts = [err.splitlines()[-1] for _, err in outputs]
    assert [child.returncode for child in children] == [143, 143], lasts
    assert lasts[0] == lasts[1] and lasts[0].startswith("stopped by SIGTERM at step ")
    step = int(lasts[0].split()[5].rstrip(","))
    assert 4 <= step < 160
    assert Checkpoints(tmp_path / "checkpoints").latest_step() == step
