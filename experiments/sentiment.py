"""IMDB sentiment: a bidirectional LSTM reads each review and says positive or negative.

    make train-sentiment                              # defaults below; writes runs/sentiment/
    make train-sentiment ARGS="--pool last --epochs 3"
    python -m experiments.sentiment --data-dir /data/tensorflow_datasets
    python -m experiments.sentiment --dataset tests/fixtures/sentiment   # train.jsonl, test.jsonl

Reviews come from tfds ``imdb_reviews`` (25,000 train / 25,000 test, balanced) through its
ArrayRecord data source, no TensorFlow needed, or from a directory of JSON lines
(``{"text": ..., "label": 0 or 1}``). A vocabulary of the ``--vocab-size`` most frequent words
of the training texts is built with HuggingFace ``tokenizers`` (lower-cased, ``<br />`` removed,
split on whitespace and punctuation; other words become ``[UNK]``) and saved as
``tokenizer.json`` in the work dir. Each review is cut or padded to ``--max-len`` tokens; the
padding never reaches the model: ``jlstm.lstm`` gets
``seq_lengths``, so the reverse direction starts at each review's own last token and ``h_n`` is
the state there. Model: embedding -> dropout -> bidirectional ``jlstm.lstm`` -> features ->
dropout -> linear -> 2 classes. ``--pool max`` (default) takes the maximum of each output feature
over the review's tokens; ``--pool last`` joins the two final states ``[h_n fwd, h_n bwd]``;
``--pool mean`` averages the outputs. Max pooling is the default because an LSTM's final state
alone, trained from scratch on reviews of hundreds of tokens, is the weaker classifier in the
literature (Dai & Le 2015; Johnson & Zhang 2016). Softmax cross-entropy, Adam (optax) with a
cosine schedule and gradient clipping. Data-parallel over the visible devices (``--devices N``),
each epoch on the devices at once and each chunk of training steps one jitted ``lax.scan``, as in
``experiments/mnist.py``. The work dir gets ``metrics.jsonl``, ``summary.json``, ``curves.png``,
``tokenizer.json`` and an orbax checkpoint per epoch; rerunning the same command resumes,
``--restart`` starts over. ``train_accuracy`` in the metrics is the running mean over the steps
since the last evaluation (with dropout, weights still changing).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlstm
from experiments import cli, input_pipeline, models, plots, training
from experiments.cli import option, shared
from experiments.mesh import data_mesh, device_name, start_distributed
from experiments.workdir import (
    Checkpoints,
    Workdir,
    run_in_workdir,
    saved_meta,
)

EVAL_BATCH = 500  # test reviews per forward pass in evaluation (bounds its memory)
TOKENIZER = "tokenizer.json"


@dataclasses.dataclass(frozen=True)
class Config:
    dataset: str = option("imdb_reviews", "tfds text dataset with 'text' and 'label' features "
                          "(imdb_reviews, yelp_polarity_reviews), or a directory holding "
                          "train.jsonl and test.jsonl")  # fmt: skip
    data_dir: str | None = shared("data_dir")
    vocab_size: int = option(20000, "words in the vocabulary, [PAD] and [UNK] included",
                             type=cli.positive_int)  # fmt: skip
    max_len: int = option(400, "tokens kept per review (longer ones are cut at the end)",
                          type=cli.positive_int)  # fmt: skip
    embed_dim: int = option(128, "size of a token's embedding", type=cli.positive_int)
    hidden_size: int = option(128, "hidden units per direction and layer", type=cli.positive_int)
    num_layers: int = option(1, "stacked bidirectional LSTM layers", type=cli.positive_int)
    pool: str = option("max", "features for the classifier: 'max' or 'mean' of the outputs over "
                       "the review's tokens, 'last' = [h_n forward, h_n reverse]",
                       choices=("max", "mean", "last"))  # fmt: skip
    dropout: float = option(0.5, "dropout on the embeddings, between layers and on the features",
                            type=cli.fraction)  # fmt: skip
    epochs: int = option(5, "passes over the training set", type=cli.positive_int)
    batch_size: int = option(64, "reviews per training step", type=cli.positive_int)
    lr: float = option(0.001, "peak learning rate of Adam", type=cli.positive_float)
    schedule: str = shared("schedule")
    grad_clip: float = shared("grad_clip")
    eval_every: int = shared("eval_every")
    seed: int = option(0, "seed of the initial weights, the shuffling and the dropout",
                       type=cli.nonnegative_int)  # fmt: skip
    workdir: str = option("runs/sentiment", "directory for metrics, plots and checkpoints")
    restart: bool = shared("restart")
    keep_checkpoints: int = shared("keep_checkpoints")
    devices: int = shared("devices")
    distributed: bool = shared("distributed")


# ------------------------------------------------------------------------------------------ data


def load(dataset: str, split: str, data_dir: str | None) -> tuple[list[str], np.ndarray]:
    """``(texts, labels)`` of a split: a list of str and an int32 ``(N,)`` array."""
    if Path(dataset).is_dir():
        return _load_jsonl(Path(dataset) / f"{split}.jsonl")
    source = input_pipeline.tfds_source(
        dataset,
        split,
        data_dir,
        check=_check_features,
        alternatives="pass --dataset imdb_reviews, or a directory holding train.jsonl and test.jsonl",
    )
    examples = input_pipeline.read_all(source)
    texts = [ex["text"] for ex in examples]
    texts = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in texts]
    return texts, np.array([ex["label"] for ex in examples], dtype=np.int32)


def _load_jsonl(path: Path) -> tuple[list[str], np.ndarray]:
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
    except OSError as e:
        raise cli.ExperimentError(
            f"cannot read {path} ({e.strerror or type(e).__name__}); --dataset DIR needs "
            'DIR/train.jsonl and DIR/test.jsonl, one {"text": ..., "label": 0 or 1} per line'
        ) from None
    texts, labels = [], []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            text, label = record["text"], record["label"]
            if not isinstance(text, str) or label not in (0, 1) or isinstance(label, bool):
                raise ValueError
        except (ValueError, KeyError, TypeError):
            raise cli.ExperimentError(
                f'{path}:{number} is not a JSON object {{"text": "...", "label": 0 or 1}}'
            ) from None
        texts.append(text)
        labels.append(label)
    if not texts:
        raise cli.ExperimentError(f"{path} holds no reviews")
    return texts, np.array(labels, dtype=np.int32)


def _check_features(features) -> str | None:
    import tensorflow_datasets as tfds

    text_ok = "text" in features and isinstance(features["text"], tfds.features.Text)
    label = features["label"] if "label" in features else None
    if not (text_ok and isinstance(label, tfds.features.ClassLabel) and label.num_classes == 2):
        return (
            f"has features {sorted(features)}, but this program reads a 'text' string and a "
            "two-class 'label' (imdb_reviews, yelp_polarity_reviews)"
        )
    return None


# ----------------------------------------------------------------------------------------- model


def init_params(config: Config, vocab_size: int, num_classes: int = 2) -> dict:
    """``{"embed": (V, E), "rnn": torch-named bidirectional LSTM, "head": {"w", "b"}}``."""
    key, embed_key = jax.random.split(jax.random.key(config.seed))
    params = models.init(
        key,
        "lstm",
        config.embed_dim,
        config.hidden_size,
        num_classes,
        num_layers=config.num_layers,
        bidirectional=True,
    )
    # torch nn.Embedding's init: N(0, 1).
    params["embed"] = jax.random.normal(embed_key, (vocab_size, config.embed_dim), jnp.float32)
    return params


def encoder(params: dict, tokens: jax.Array, *, dropout: float = 0.0, key: jax.Array | None = None):
    """Embeds ``(N, L)`` token ids and runs the bidirectional LSTM over each review's own length.

    Returns ``(output, (h_n, c_n), lengths)``: ``output`` is ``(N, L, 2H)``, zero past each
    length; ``h_n[-2]`` / ``h_n[-1]`` are the top layer's forward / reverse final states.
    ``dropout`` with a ``key`` drops embeddings and activations between layers.
    """
    lengths = jnp.sum(tokens != 0, axis=-1)
    x = params["embed"][tokens]
    keys = (None, None) if key is None else jax.random.split(key)
    x = models.dropout(x, dropout, keys[0])
    output, state = jlstm.lstm(
        params["rnn"], x, batch_first=True, seq_lengths=lengths, dropout=dropout, key=keys[1]
    )
    return output, state, lengths


def logits_fn(
    config: Config, params: dict, tokens: jax.Array, key: jax.Array | None = None
) -> jax.Array:
    """``(N, 2)`` logits of ``(N, L)`` token ids; dropout only when a ``key`` is given."""
    keys = (None, None) if key is None else jax.random.split(key)
    output, state, lengths = encoder(params, tokens, dropout=config.dropout, key=keys[0])
    features = pool(config.pool, output, state, lengths)
    return models.head(params, models.dropout(features, config.dropout, keys[1]))


def pool(kind: str, output: jax.Array, state, lengths: jax.Array) -> jax.Array:
    """``(N, 2H)`` features of a review from the encoder's outputs; padding never counts."""
    if kind == "last":
        return models.last_hidden("lstm", state, bidirectional=True)
    if kind == "mean":
        return output.sum(axis=1) / jnp.maximum(lengths, 1)[:, None].astype(output.dtype)
    valid = jnp.arange(output.shape[1])[None, :] < lengths[:, None]
    pooled = jnp.where(valid[:, :, None], output, -jnp.inf).max(axis=1)
    return jnp.where(lengths[:, None] > 0, pooled, 0.0)  # an empty review has no maximum


# -------------------------------------------------------------------------------------- training


# Fields that the compiled functions do not depend on (see training.compiled).
UNCOMPILED = {"dataset": "", "data_dir": None, "vocab_size": 0, "max_len": 0, "eval_every": 0,
              "seed": 0, "workdir": "", "restart": False, "keep_checkpoints": 0, "devices": 0,
              "distributed": False}  # fmt: skip


def make_step(config: Config, tx: optax.GradientTransformation):
    """``step(state, (tokens, labels), key) -> (state, (loss, accuracy))``: one Adam step on a
    batch, with dropout drawn from ``key``."""

    def loss_fn(params, tokens, labels, key):
        logits = logits_fn(config, params, tokens, key)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, jnp.mean(jnp.argmax(logits, axis=-1) == labels)

    def step(state, batch, key):
        params, opt_state = state
        (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, *batch, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), (loss, accuracy)

    return step


def train(config: Config) -> dict:
    """Trains (or resumes) as ``config`` says, writes the work dir, returns the summary."""
    start_distributed(config.distributed)
    return run_in_workdir(config, _train)


def _train(config: Config, workdir: Workdir, checkpoints: Checkpoints) -> dict:
    meta = saved_meta(checkpoints, config, free=cli.RESUMABLE_CHANGES)
    mesh = data_mesh(config.devices)
    train_texts, train_y = load(config.dataset, "train", config.data_dir)
    test_texts, test_y = load(config.dataset, "test", config.data_dir)
    n_train, n_test = len(train_y), len(test_y)
    steps_per_epoch = training.steps_per_epoch(config, n_train, "reviews", mesh)
    tokenizer_path = workdir / TOKENIZER
    if meta is None:  # a new run learns its vocabulary; a resumed one reads it back
        tokenizer = input_pipeline.train_tokenizer(train_texts, config.vocab_size)
        if workdir.primary:  # the others learnt the same one
            tokenizer.save(str(tokenizer_path))
    elif tokenizer_path.exists():
        tokenizer = input_pipeline.load_tokenizer(tokenizer_path)
    else:
        raise cli.ExperimentError(
            f"the checkpoint in {workdir.path} has no {TOKENIZER} beside it; add --restart"
        )
    train_x, lengths = input_pipeline.encode(tokenizer, train_texts, config.max_len)
    test_x, _ = input_pipeline.encode(tokenizer, test_texts, config.max_len)
    test_data = input_pipeline.eval_batches(mesh, min(EVAL_BATCH, n_test), test_x, test_y)
    params = init_params(config, tokenizer.get_vocab_size())
    train_chunk, evaluate, chunk, state, at = training.start(
        config, UNCOMPILED, logits_fn, make_step, steps_per_epoch, params, mesh,
        (checkpoints, workdir, meta),
    )  # fmt: skip
    print(
        f"{config.dataset}: {n_train} train / {n_test} test reviews; vocabulary of "
        f"{tokenizer.get_vocab_size()} tokens; median review {np.median(lengths):.0f} "
        f"tokens, {np.mean(lengths > config.max_len):.0%} cut to --max-len {config.max_len}; "
        f"bidirectional lstm {config.hidden_size}x{config.num_layers}, {config.pool} pooling, "
        f"{training.num_params(params)} parameters; {config.epochs} epochs of {steps_per_epoch} "
        f"steps on {device_name(mesh)}"
    )

    data_key, dropout_key = jax.random.split(jax.random.fold_in(jax.random.key(config.seed), 1))

    def epoch_steps(epoch: int):
        order = input_pipeline.epoch_batches(
            data_key, epoch, n_train, steps_per_epoch, config.batch_size
        )
        data = tuple(input_pipeline.shard_batches(mesh, order, train_x, train_y))

        def run(state, start: int, n: int):
            key = jax.random.fold_in(dropout_key, epoch * steps_per_epoch + start)
            state, (losses, accuracies) = train_chunk(state, start, n, data, key)
            return state, {"loss": losses, "accuracy": accuracies}

        return run

    def test_metrics(state) -> dict:
        loss_sum, correct, _ = evaluate(state[0], *test_data)
        return {"test_loss": float(loss_sum) / n_test, "test_accuracy": int(correct) / n_test}

    def write_curves(records: list[dict]) -> None:
        plots.plot_curves(
            workdir / "curves.png",
            records,
            [
                ("train_loss", "train loss", "log"),
                ("test_loss", "test loss", "log"),
                ("test_accuracy", "test accuracy", "percent"),
            ],
            title=f"{config.dataset}: bidirectional lstm {config.hidden_size}, "
            f"{config.pool} pooling",
        )

    state, at = training.train_epochs(
        config,
        state,
        at,
        steps_per_epoch=steps_per_epoch,
        chunk=chunk,
        epoch_steps=epoch_steps,
        evaluate=test_metrics,
        workdir=workdir,
        checkpoints=checkpoints,
        unit="review",
        plot=write_curves,
    )

    if not workdir.primary:
        return {}

    def extra(records: list[dict]) -> dict:
        return {
            "train_accuracy": records[-1]["train_accuracy"],
            "vocab_size": tokenizer.get_vocab_size(),
        }

    return training.finish(config, at, state, mesh, workdir, write_curves, extra)


if __name__ == "__main__":
    sys.exit(cli.main(train, Config, description=__doc__, prog="python -m experiments.sentiment"))
