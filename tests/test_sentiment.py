"""The IMDB sentiment program, without IMDB: tiny runs on ``tfds.testing.mock_data`` (random
letters for text) check every output and resume; an in-repo fixture of a dozen reviews
(``tests/fixtures/sentiment``) goes through the same tokenizer, batching and training and must be
learnt perfectly; the model must not see the padding.
"""

import importlib.util
import json
import math
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")
pytest.importorskip("tokenizers")
pytest.importorskip("optax")
pytest.importorskip("orbax.checkpoint")

from helpers import (  # noqa: E402
    assert_png,
    interrupt_after_first_checkpoint,
    read_metrics,
    without_seconds,
)

import jlstm  # noqa: E402
from experiments import cli, input_pipeline, sentiment  # noqa: E402
from experiments.workdir import Checkpoints  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "sentiment"
TINY = ["--hidden-size", "8", "--embed-dim", "8", "--max-len", "16", "--vocab-size", "64",
        "--epochs", "2", "--batch-size", "8", "--eval-every", "3"]  # fmt: skip


def run(workdir, *flags):
    return cli.main(sentiment.train, sentiment.Config, [*TINY, "--workdir", str(workdir), *flags])


def run_mock(workdir, *flags, num_examples=32):
    with tfds.testing.mock_data(num_examples=num_examples):
        return run(workdir, *flags)


def test_mock_imdb_writes_every_output(tmp_path):
    assert run_mock(tmp_path) == 0

    records = read_metrics(tmp_path)  # 32 reviews / 8 = 4 steps per epoch; eval every 3
    assert [r["step"] for r in records] == [3, 4, 6, 8]
    assert [r["epoch"] for r in records] == [0.75, 1.0, 1.5, 2.0]
    for r in records:
        assert set(r) == {"epoch", "step", "train_loss", "train_accuracy", "test_loss",
                          "test_accuracy", "seconds"}  # fmt: skip
        assert 0 <= r["test_accuracy"] <= 1 and 0 <= r["train_accuracy"] <= 1
        assert math.isfinite(r["train_loss"]) and math.isfinite(r["test_loss"])

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["test_accuracy"] == records[-1]["test_accuracy"]
    assert summary["epochs"] == 2 and summary["steps"] == 8
    assert summary["train_seconds"] > 0 and summary["examples_per_second"] > 0
    assert summary["config"]["dataset"] == "imdb_reviews"
    assert summary["config"]["pool"] == "max"
    assert 2 < summary["vocab_size"] <= 64
    tokenizer = input_pipeline.load_tokenizer(tmp_path / "tokenizer.json")
    assert tokenizer.get_vocab_size() == summary["vocab_size"]
    assert_png(tmp_path / "curves.png")
    assert Checkpoints(tmp_path / "checkpoints").latest_step() == 8


def test_mock_imdb_resume_continues_from_checkpoint(tmp_path, monkeypatch, capsys):
    assert run_mock(tmp_path / "straight") == 0

    interrupt_after_first_checkpoint(monkeypatch)
    assert run_mock(tmp_path / "resumed") == 130
    assert [r["step"] for r in read_metrics(tmp_path / "resumed")] == [3, 4]
    assert run_mock(tmp_path / "resumed") == 0
    assert "resuming" in capsys.readouterr().out

    # Same flags and seed (dropout included): the resumed run's metrics equal the straight run's.
    expected = without_seconds(read_metrics(tmp_path / "straight"))
    assert without_seconds(read_metrics(tmp_path / "resumed")) == expected

    assert run_mock(tmp_path / "resumed", "--max-len", "12") == 1
    assert "--max-len 16, not 12" in capsys.readouterr().err


def test_fixture_reviews_are_learnt(tmp_path):
    # The training reviews are also the test set, so test_accuracy is the final training accuracy
    # of the final weights, without dropout.
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(FIXTURE / "train.jsonl", data / "train.jsonl")
    shutil.copy(FIXTURE / "train.jsonl", data / "test.jsonl")
    flags = ["--dataset", str(data), "--epochs", "10", "--batch-size", "4",
             "--hidden-size", "16", "--embed-dim", "16", "--max-len", "24", "--eval-every", "0",
             "--vocab-size", "1000", "--dropout", "0", "--lr", "0.01", "--schedule", "constant"]  # fmt: skip
    assert run(tmp_path / "run", *flags) == 0

    records = read_metrics(tmp_path / "run")
    assert len(records) == 10
    assert records[-1]["test_accuracy"] == 1.0
    assert records[-1]["test_loss"] < 0.1 < records[0]["train_loss"]


def test_fixture_runs_with_held_out_reviews(tmp_path):
    flags = ["--dataset", str(FIXTURE), "--pool", "last", "--batch-size", "4"]
    assert run(tmp_path, *flags) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["test_accuracy"] in {0, 0.25, 0.5, 0.75, 1}


# ------------------------------------------------------------------------ padding never leaks


def small_model(pool="max", num_layers=1):
    config = sentiment.Config(hidden_size=6, embed_dim=5, pool=pool, num_layers=num_layers)
    return config, sentiment.init_params(config, vocab_size=30)


def review_and_padded(length=7, padded_length=12):
    ids = np.random.default_rng(0).integers(2, 30, length).astype(np.int32)
    return jnp.asarray(ids[None]), jnp.asarray(np.pad(ids, (0, padded_length - length))[None])


@pytest.mark.parametrize("num_layers", [1, 2])
def test_reverse_direction_starts_at_the_last_real_token(num_layers):
    _, params = small_model(num_layers=num_layers)
    review, padded = review_and_padded()
    out, (h_n, c_n), lengths = sentiment.encoder(params, review)
    out_p, (h_n_p, c_n_p), lengths_p = sentiment.encoder(params, padded)

    assert int(lengths[0]) == int(lengths_p[0]) == 7
    # h_n[-1] is the top layer's reverse direction: its state after reading back to token 0.
    np.testing.assert_allclose(h_n_p[-1], h_n[-1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h_n_p, h_n, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(c_n_p, c_n, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out_p[:, :7], out, rtol=1e-5, atol=1e-6)
    assert not np.any(out_p[:, 7:])

    # Without seq_lengths the reverse direction would first read the 5 padding embeddings.
    _, (h_n_leaky, _) = jlstm.lstm(params["rnn"], params["embed"][padded], batch_first=True)
    assert not np.allclose(h_n_leaky[-1], h_n[-1], atol=1e-3)


@pytest.mark.parametrize("pool", ["max", "mean", "last"])
def test_logits_do_not_depend_on_padding(pool):
    config, params = small_model(pool)
    review, padded = review_and_padded()
    np.testing.assert_allclose(
        sentiment.logits_fn(config, params, padded),
        sentiment.logits_fn(config, params, review),
        rtol=1e-5,
        atol=1e-6,
    )
    # An empty review (all padding) gets finite logits.
    assert np.all(np.isfinite(sentiment.logits_fn(config, params, jnp.zeros((1, 4), jnp.int32))))


def test_dropout_needs_a_key():
    config, params = small_model()
    _, padded = review_and_padded()
    logits = sentiment.logits_fn(config, params, padded)
    np.testing.assert_array_equal(sentiment.logits_fn(config, params, padded), logits)
    dropped = sentiment.logits_fn(config, params, padded, jax.random.key(1))
    assert not np.allclose(dropped, logits)


# --------------------------------------------------------------------------------- tokenizer


def test_tokenizer_is_deterministic_and_encode_cuts_and_pads():
    texts, labels = sentiment.load(str(FIXTURE), "train", None)
    assert len(texts) == 12 and labels.tolist() == [1, 0] * 6
    tokenizer = input_pipeline.train_tokenizer(texts, 1000)
    assert input_pipeline.train_tokenizer(texts, 1000).get_vocab() == tokenizer.get_vocab()
    assert tokenizer.token_to_id("[PAD]") == 0 and tokenizer.token_to_id("[UNK]") == 1
    assert len(input_pipeline.train_tokenizer(texts, 20).get_vocab()) == 20

    reviews = ["A wonderful film.<br /><br />Loved it!", "", "[PAD] zyzzyva " * 10]
    tokens, lengths = input_pipeline.encode(tokenizer, reviews, 8)
    assert tokens.dtype == np.int32 and tokens.shape == (3, 8)
    assert lengths.tolist() == [7, 0, 20]  # full lengths; "<br />" is dropped
    wonderful, loved = tokenizer.token_to_id("wonderful"), tokenizer.token_to_id("loved")
    assert tokens[0, 1] == wonderful and tokens[0, 4] == loved and tokens[0, 7] == 0
    assert not tokens[1].any()
    assert np.all(tokens[2] == 1)  # unknown words and a literal "[PAD]" are [UNK], not padding


# ------------------------------------------------------------------------------- error paths


@pytest.mark.skipif(
    importlib.util.find_spec("tensorflow") is not None,
    reason="with TensorFlow installed, tfds would try to download and prepare the dataset",
)
def test_missing_imdb_says_how_to_point_at_prepared_data(tmp_path, capsys):
    argv = ["--data-dir", str(tmp_path / "empty"), "--workdir", str(tmp_path / "run")]
    assert cli.main(sentiment.train, sentiment.Config, argv) == 1
    err = capsys.readouterr().err
    assert f"tfds found no prepared 'imdb_reviews' in {tmp_path / 'empty'}" in err
    assert "--data-dir" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            '{"text": "fine", "label": 2}',
            ':1 is not a JSON object {"text": "...", "label": 0 or 1}',
        ),
        ('{"review": "fine"}', ":1 is not a JSON object"),
        ("not json", ":1 is not a JSON object"),
    ],
)
def test_bad_jsonl_is_one_clear_line(tmp_path, capsys, line, message):
    (tmp_path / "train.jsonl").write_text(line + "\n")
    argv = ["--dataset", str(tmp_path), "--workdir", str(tmp_path / "run")]
    assert cli.main(sentiment.train, sentiment.Config, argv) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'train.jsonl'}{message}" in err and err.count("\n") == 1


def test_dataset_without_test_split(tmp_path, capsys):
    shutil.copy(FIXTURE / "train.jsonl", tmp_path / "train.jsonl")
    argv = ["--dataset", str(tmp_path), "--workdir", str(tmp_path / "run")]
    assert cli.main(sentiment.train, sentiment.Config, argv) == 1
    assert f"cannot read {tmp_path / 'test.jsonl'}" in capsys.readouterr().err


def test_dataset_of_other_features_is_refused(tmp_path, capsys):
    argv = ["--dataset", "mnist", "--workdir", str(tmp_path)]
    with tfds.testing.mock_data(num_examples=4):
        assert cli.main(sentiment.train, sentiment.Config, argv) == 1
    assert "--dataset mnist has features ['image', 'label']" in capsys.readouterr().err


def test_dropout_of_one_is_refused(capsys):
    with pytest.raises(SystemExit):
        cli.main(sentiment.train, sentiment.Config, ["--dropout", "1"])
    assert "argument --dropout: must be in [0, 1), got 1" in capsys.readouterr().err
