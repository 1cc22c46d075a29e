"""What real runs meet: SIGTERM (preemption) and SIGINT mid-epoch, a cut last metrics line, damaged
checkpoint files. Each ends in a run that resumes with the metrics of a run that never stopped, or
in one clear sentence.

The signals are real (sent to the process itself, or from outside to a ``python -m`` command);
a stop must land on a chunk of steps inside an epoch, between two evaluations, so that the
checkpoint also carries the training losses logged at the next evaluation.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")
pytest.importorskip("optax")
pytest.importorskip("orbax.checkpoint")
pytest.importorskip("tokenizers")

from helpers import read_metrics, signal_after_chunks, without_seconds  # noqa: E402

from experiments import cli, mnist, regression, sentiment  # noqa: E402
from experiments.workdir import Checkpoints  # noqa: E402

ROOT = Path(__file__).parent.parent
FIXTURE = Path(__file__).parent / "fixtures" / "sentiment"

# 64 mock images / 16 = 4 steps per epoch, one step per chunk, evaluations at steps 3, 4, 6, 8.
MNIST = ["--hidden-size", "8", "--epochs", "2", "--batch-size", "16", "--eval-every", "3"]
SENTIMENT = ["--hidden-size", "8", "--embed-dim", "8", "--max-len", "16", "--vocab-size", "64",
             "--epochs", "2", "--batch-size", "8", "--eval-every", "3"]  # fmt: skip
REGRESSION = ["--steps", "20", "--eval-every", "5", "--hidden-size", "4"]


def run(program, workdir, *flags):
    """``cli.main`` of ``program`` ("mnist", "sentiment" on mock data, or "regression")."""
    module, base, examples = {
        "mnist": (mnist, MNIST, 64),
        "sentiment": (sentiment, SENTIMENT, 32),
        "regression": (regression, REGRESSION, 0),
    }[program]
    argv = [*base, "--workdir", str(workdir), *flags]
    with tfds.testing.mock_data(num_examples=examples or 1):
        return cli.main(module.train, module.Config, argv)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The metrics of uninterrupted runs, per program."""
    found = {}

    def get(program):
        if program not in found:
            workdir = tmp_path_factory.mktemp(program)
            assert run(program, workdir) == 0
            found[program] = without_seconds(read_metrics(workdir))
        return found[program]

    return get


# ------------------------------------------------------------------------------------ signals


@pytest.mark.parametrize(
    ("program", "signum", "chunks", "stop"),
    [
        ("mnist", signal.SIGTERM, 2, 2),  # mid-epoch, between evaluations
        ("mnist", signal.SIGINT, 5, 5),  # mid-epoch 2, after evaluations at steps 3 and 4
        ("sentiment", signal.SIGTERM, 5, 5),  # dropout keys depend on the step
        ("regression", signal.SIGTERM, 2, 10),  # chunks of --eval-every 5 steps
    ],
)
def test_signal_stops_at_the_chunk_and_resumes_exactly(
    program, signum, chunks, stop, tmp_path, monkeypatch, capsys, straight
):
    expected = straight(program)
    capsys.readouterr()
    handler = signal.getsignal(signum)
    signal_after_chunks(monkeypatch, chunks, signum)
    assert run(program, tmp_path) == 128 + signum
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith(
        f"stopped by {signal.Signals(signum).name} at step {stop}, where it saved a checkpoint; "
        "rerun the same command to resume: "
    )
    assert "--workdir" in err[-1]
    assert Checkpoints(tmp_path / "checkpoints").latest_step() == stop
    logged = [r["step"] for r in read_metrics(tmp_path)]
    assert logged == [r["step"] for r in expected if r["step"] <= stop]
    assert (tmp_path / "curves.png").exists() == bool(logged)  # the curves so far, if any
    assert not (tmp_path / "summary.json").exists()
    assert signal.getsignal(signum) is handler  # the run put it back

    assert run(program, tmp_path) == 0
    assert f"(step {stop})" in capsys.readouterr().out or program == "regression"
    assert without_seconds(read_metrics(tmp_path)) == expected


CHILD = r"""
import json, signal, sys
import jax, pytest
import tensorflow_datasets as tfds
jax.config.update("jax_enable_x64", True)  # as conftest does: the numbers compare with the tests'
from helpers import signal_after_chunks
from experiments import cli, mnist
flags, chunks, names = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3].split(",")
signal_after_chunks(pytest.MonkeyPatch(), chunks, *(signal.Signals[name] for name in names))
with tfds.testing.mock_data(num_examples=64):
    sys.exit(cli.main(mnist.train, mnist.Config, flags, prog="python -m experiments.mnist"))
"""


def child(workdir, chunks, *signals):
    env = os.environ | {
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
    }
    argv = json.dumps([*MNIST, "--workdir", str(workdir)])
    return subprocess.run(
        [sys.executable, "-c", CHILD, argv, str(chunks), ",".join(signals)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_sigterm_in_a_process_exits_143_and_resumes_exactly(tmp_path, straight, capsys):
    done = child(tmp_path, 2, "SIGTERM")
    assert done.returncode == 143, done.stderr[-3000:]
    assert done.stderr.splitlines()[-1] == (
        "stopped by SIGTERM at step 2, where it saved a checkpoint; rerun the same command to "
        f"resume: python -m experiments.mnist {' '.join(MNIST)} --workdir {tmp_path}"
    )
    assert "Traceback" not in done.stderr
    assert Checkpoints(tmp_path / "checkpoints").latest_step() == 2
    assert run("mnist", tmp_path) == 0
    assert without_seconds(read_metrics(tmp_path)) == straight("mnist")


def test_second_signal_stops_at_once(tmp_path):
    done = child(tmp_path, 2, "SIGTERM", "SIGTERM")
    assert done.returncode == -signal.SIGTERM  # killed by the signal, nothing more ran
    assert "stopped by" not in done.stderr
    assert Checkpoints(tmp_path / "checkpoints").latest_step() is None


def test_sigterm_from_outside_to_the_command(tmp_path, capsys):
    # As a scheduler does it: the real command, signalled while it starts training.
    data = tmp_path / "data"
    shutil.copytree(FIXTURE, data)
    command = [sys.executable, "-m", "experiments.sentiment", "--dataset", str(data),
               "--epochs", "3", "--batch-size", "4", "--hidden-size", "8", "--embed-dim", "8",
               "--max-len", "16", "--workdir", str(tmp_path / "run")]  # fmt: skip
    env = os.environ | {"JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    for line in proc.stdout:
        if "reviews;" in line:  # the data is read; compilation and training come next
            proc.send_signal(signal.SIGTERM)
            break
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    last = err.splitlines()[-1]
    assert last.startswith("stopped by SIGTERM at step ") and "Traceback" not in err
    step = int(last.split()[5].rstrip(","))
    assert 0 < step < 9  # 12 reviews / 4 = 3 steps per epoch
    assert Checkpoints(tmp_path / "run" / "checkpoints").latest_step() == step

    assert cli.main(sentiment.train, sentiment.Config, command[3:]) == 0
    assert f"(step {step})" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [3, 6, 9]


# ------------------------------------------------------------------------------- damaged files


def test_cut_last_metrics_line_is_dropped_with_a_warning(tmp_path, monkeypatch, capsys, straight):
    signal_after_chunks(monkeypatch, 5, signal.SIGTERM)
    assert run("mnist", tmp_path) == 143
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"epoch": 1.9, "step": 17')  # a kill in the middle of a write
    capsys.readouterr()
    assert run("mnist", tmp_path) == 0
    err = capsys.readouterr().err
    assert f"warning: dropped the cut last line of {tmp_path / 'metrics.jsonl'}\n" in err
    assert without_seconds(read_metrics(tmp_path)) == straight("mnist")


def test_damaged_metrics_line_is_one_sentence(tmp_path, capsys):
    assert run("regression", tmp_path) == 0
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][:10]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    assert run("regression", tmp_path) == 1
    assert capsys.readouterr().err == (
        f"error: line 2 of {tmp_path / 'metrics.jsonl'} is not a JSON record; delete that line "
        "to keep the run, or add --restart to start over\n"
    )


def flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 3, min(len(data), len(data) // 3 + 8)):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def data_files(checkpoint: Path) -> list[Path]:
    """The files of a checkpoint that hold its arrays (OCDBT data files)."""
    return sorted(path for path in (checkpoint / "state").rglob("*") if path.parent.name == "d")


def test_flipped_bytes_in_the_latest_checkpoint_fall_back(tmp_path, capsys, straight):
    assert run("mnist", tmp_path) == 0  # checkpoints of steps 4 and 8
    for path in data_files(tmp_path / "checkpoints" / "8"):
        flip_bytes(path)
    capsys.readouterr()
    assert run("mnist", tmp_path) == 0
    out, err = capsys.readouterr()
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1
    assert warnings[0].startswith(
        f"warning: the checkpoint of step 8 in {tmp_path / 'checkpoints'} is damaged ("
    )
    assert warnings[0].endswith("; moved it to damaged-8, falling back to the one before")
    assert (tmp_path / "checkpoints" / "damaged-8" / "sha256sums.json").exists()
    assert "resuming" in out and "(step 4)" in out
    assert without_seconds(read_metrics(tmp_path)) == straight("mnist")
    assert Checkpoints(tmp_path / "checkpoints").latest_step() == 8


@pytest.mark.parametrize("damage", ["data", "meta", "array metadata"])
def test_every_checkpoint_damaged_is_one_sentence(tmp_path, capsys, damage):
    assert run("regression", tmp_path, "--keep-checkpoints", "2") == 0  # steps 15 and 20
    for step in ("15", "20"):
        checkpoint = tmp_path / "checkpoints" / step
        paths = {
            "data": data_files(checkpoint),
            "meta": [checkpoint / "meta" / "metadata"],
            "array metadata": [checkpoint / "state" / "_METADATA"],
        }[damage]
        for path in paths:
            flip_bytes(path)
    capsys.readouterr()
    assert run("regression", tmp_path) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert [line.split(" is damaged")[0] for line in lines[:-1]] == [
        f"warning: the checkpoint of step {step} in {tmp_path / 'checkpoints'}" for step in (20, 15)
    ]
    assert lines[-1].startswith(f"error: no checkpoint in the work dir {tmp_path} can be restored")
    assert lines[-1].endswith("; add --restart to start over there, or pass another --workdir")

    assert run("regression", tmp_path, "--restart") == 0


DAMAGES = {
    "flip": flip_bytes,
    "flip all": lambda p: p.write_bytes(bytes(b ^ 0x55 for b in p.read_bytes())),
    "cut": lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
    "empty": lambda p: p.write_bytes(b""),
    "delete": Path.unlink,
}


def test_any_damaged_file_restores_a_good_checkpoint(tmp_path, capsys):
    # Every file of the latest checkpoint, damaged every way: restoring gives the latest state
    # (orbax did not need that file) or the one before, never wrong arrays or an exception.
    state = {"w": jnp.arange(300.0), "b": jnp.ones((2, 3), jnp.int32)}
    pristine = tmp_path / "pristine"
    checkpoints = Checkpoints(pristine)
    for step in (1, 2):
        checkpoints.save(step, jax_tree_plus(state, step), {"step": step})
    checkpoints.close()
    files = sorted(p.relative_to(pristine) for p in (pristine / "2").rglob("*") if p.is_file())
    assert len(files) > 10
    for file in files:
        for name, damage in DAMAGES.items():
            copy = tmp_path / "copy"
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(pristine, copy)
            damage(copy / file)
            checkpoints = Checkpoints(copy)
            restored, meta = checkpoints.restore(state) if checkpoints.meta() else (None, None)
            checkpoints.close()
            err = capsys.readouterr().err
            assert meta is not None, (file, name)
            if meta["step"] == 1:
                assert "the checkpoint of step 2 in" in err, (file, name)
            for key in state:
                np.testing.assert_array_equal(
                    restored[key], jax_tree_plus(state, meta["step"])[key], err_msg=str(file)
                )


def jax_tree_plus(state, step):
    return {key: value + step for key, value in state.items()}
