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

import argparse
import dataclasses
import functools
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

import jlstm
from experiments import common, models
from experiments.common import ExperimentError, option

PAD, UNK = "[PAD]", "[UNK]"  # special tokens; PAD gets id 0, so lengths are ``tokens != 0``
EVAL_BATCH = 500  # test reviews per forward pass in evaluation (bounds its memory)
TOKENIZER = "tokenizer.json"


def dropout_rate(text: str) -> float:
    rate = common.nonnegative_float(text)
    if rate >= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return rate


@dataclasses.dataclass(frozen=True)
class Config:
    dataset: str = option("imdb_reviews", "tfds text dataset with 'text' and 'label' features "
                          "(imdb_reviews, yelp_polarity_reviews), or a directory holding "
                          "train.jsonl and test.jsonl")  # fmt: skip
    data_dir: str | None = option(None, "where tfds looks for prepared data "
                                  "(default: $TFDS_DATA_DIR, else ~/tensorflow_datasets)")  # fmt: skip
    vocab_size: int = option(20000, "words in the vocabulary, [PAD] and [UNK] included",
                             type=common.positive_int)  # fmt: skip
    max_len: int = option(400, "tokens kept per review (longer ones are cut at the end)",
                          type=common.positive_int)  # fmt: skip
    embed_dim: int = option(128, "size of a token's embedding", type=common.positive_int)
    hidden_size: int = option(128, "hidden units per direction and layer", type=common.positive_int)
    num_layers: int = option(1, "stacked bidirectional LSTM layers", type=common.positive_int)
    pool: str = option("max", "features for the classifier: 'max' or 'mean' of the outputs over "
                       "the review's tokens, 'last' = [h_n forward, h_n reverse]",
                       choices=("max", "mean", "last"))  # fmt: skip
    dropout: float = option(0.5, "dropout on the embeddings, between layers and on the features",
                            type=dropout_rate)  # fmt: skip
    epochs: int = option(5, "passes over the training set", type=common.positive_int)
    batch_size: int = option(64, "reviews per training step", type=common.positive_int)
    lr: float = option(0.001, "peak learning rate of Adam", type=common.positive_float)
    schedule: str = option("cosine", "learning rate schedule: 'cosine' warms up over 5 %% of "
                           "the steps then decays to 0; 'constant' keeps --lr",
                           choices=("cosine", "constant"))  # fmt: skip
    grad_clip: float = option(1.0, "clip gradients to this global norm (0: no clipping)",
                              type=common.nonnegative_float)  # fmt: skip
    eval_every: int = option(0, "also evaluate every N steps (0: after each epoch only)",
                             type=common.nonnegative_int)  # fmt: skip
    seed: int = option(0, "seed of the initial weights, the shuffling and the dropout",
                       type=common.nonnegative_int)  # fmt: skip
    workdir: str = option("runs/sentiment", "directory for metrics, plots and checkpoints")
    restart: bool = option(False, "delete the work dir's checkpoints and metrics, start over")
    keep_checkpoints: int = option(2, "checkpoints kept, the latest ones (an earlier one is the "
                                   "fallback where the latest is damaged)",
                                   type=common.positive_int)  # fmt: skip
    devices: int = option(0, "devices to split each batch over, data-parallel (0: all visible)",
                          type=common.nonnegative_int)  # fmt: skip
    distributed: bool = option(False, "join a multi-host run: jax.distributed.initialize() "
                               "(also done when JAX_COORDINATOR_ADDRESS is set)")  # fmt: skip


# Flags that may change between a run and its resumption.
RESUMABLE_CHANGES = ("data_dir", "eval_every", "workdir", "restart", "keep_checkpoints",
                     "devices", "distributed")  # fmt: skip


# ------------------------------------------------------------------------------------------ data


def load(dataset: str, split: str, data_dir: str | None) -> tuple[list[str], np.ndarray]:
    """``(texts, labels)`` of a split: a list of str and an int32 ``(N,)`` array."""
    if Path(dataset).is_dir():
        return _load_jsonl(Path(dataset) / f"{split}.jsonl")
    source = common.tfds_source(
        dataset,
        split,
        data_dir,
        check=_check_features,
        alternatives="pass --dataset imdb_reviews, or a directory holding train.jsonl and test.jsonl",
    )
    examples = common.read_all(source)
    texts = [ex["text"] for ex in examples]
    texts = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in texts]
    return texts, np.array([ex["label"] for ex in examples], dtype=np.int32)


def _load_jsonl(path: Path) -> tuple[list[str], np.ndarray]:
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
    except OSError as e:
        raise ExperimentError(
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
            raise ExperimentError(
                f'{path}:{number} is not a JSON object {{"text": "...", "label": 0 or 1}}'
            ) from None
        texts.append(text)
        labels.append(label)
    if not texts:
        raise ExperimentError(f"{path} holds no reviews")
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


# ------------------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: list[str], vocab_size: int):
    """A word-level ``tokenizers.Tokenizer`` trained on ``texts``: the ``vocab_size - 2`` most
    frequent words (ties broken by the word, so the same texts give the same ids), ``[PAD]`` = 0
    and ``[UNK]`` = 1 for every other word.

    Word level rather than WordPiece or BPE: their trainers in ``tokenizers`` may pick different
    merges from run to run (hash-map order), and a vocabulary of whole words is the usual one for
    this model.
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, trainers
    from tokenizers.models import WordLevel

    tokenizer = Tokenizer(WordLevel(unk_token=UNK))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Replace("<br />", " "), normalizers.BertNormalizer(lowercase=True)]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordLevelTrainer(
        vocab_size=vocab_size, special_tokens=[PAD, UNK], show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer, length=len(texts))
    return tokenizer


def load_tokenizer(path: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def encode(tokenizer, texts: list[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens, lengths)``: int32 ``(N, max_len)`` ids of each review cut to ``max_len`` and
    right-padded with ``[PAD]`` = 0, and each review's full length in tokens ``(N,)``."""
    unk = tokenizer.token_to_id(UNK)
    encodings = tokenizer.encode_batch_fast(texts)  # in parallel, without character offsets
    tokens = np.zeros((len(texts), max_len), np.int32)
    for row, encoding in zip(tokens, encodings, strict=True):
        ids = np.array(encoding.ids[:max_len], np.int32)
        row[: len(ids)] = np.where(ids == 0, unk, ids)  # a literal "[PAD]" is no padding
    return tokens, np.array([len(e) for e in encodings], np.int32)


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
    x = _dropout(x, dropout, keys[0])
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
    return models.head(params, _dropout(features, config.dropout, keys[1]))


def pool(kind: str, output: jax.Array, state, lengths: jax.Array) -> jax.Array:
    """``(N, 2H)`` features of a review from the encoder's outputs; padding never counts."""
    if kind == "last":
        return models.last_hidden("lstm", state, bidirectional=True)
    if kind == "mean":
        return output.sum(axis=1) / jnp.maximum(lengths, 1)[:, None].astype(output.dtype)
    valid = jnp.arange(output.shape[1])[None, :] < lengths[:, None]
    pooled = jnp.where(valid[:, :, None], output, -jnp.inf).max(axis=1)
    return jnp.where(lengths[:, None] > 0, pooled, 0.0)  # an empty review has no maximum


def _dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    if key is None or rate == 0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0)


# -------------------------------------------------------------------------------------- training


@functools.cache
def compiled(config: Config, total_steps: int, chunk: int, mesh: Mesh):
    """``(tx, train_chunk, evaluate)`` for the model and optimizer that ``config`` describes,
    data-parallel over ``mesh`` (see :func:`common.jit_chunk` and :func:`common.jit_evaluate`).

    Cached, so that runs in one process (tests, a notebook) compile each model once; call it with
    ``dataclasses.replace(config, **UNCOMPILED)`` so that fields the functions ignore do not count.
    """
    tx = common.optimizer(
        config.lr, total_steps, schedule=config.schedule, grad_clip=config.grad_clip
    )
    evaluate = common.jit_evaluate(lambda params, x: logits_fn(config, params, x), mesh)
    return tx, common.jit_chunk(make_step(config, tx), chunk, mesh), evaluate


# Fields that the compiled functions do not depend on.
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
    common.start_distributed(config.distributed)
    return common.run_in_workdir(config, _train)


def _train(config: Config, workdir: common.Workdir, checkpoints: common.Checkpoints) -> dict:
    meta = common.saved_meta(checkpoints, config, free=RESUMABLE_CHANGES)
    mesh = common.data_mesh(config.devices)
    train_texts, train_y = load(config.dataset, "train", config.data_dir)
    test_texts, test_y = load(config.dataset, "test", config.data_dir)
    n_train, n_test = len(train_y), len(test_y)
    if config.batch_size > n_train:
        raise ExperimentError(
            f"--batch-size {config.batch_size} is larger than the {n_train} training reviews"
        )
    common.check_batch_size(config.batch_size, mesh)
    tokenizer_path = workdir / TOKENIZER
    if meta is None:  # a new run learns its vocabulary; a resumed one reads it back
        tokenizer = train_tokenizer(train_texts, config.vocab_size)
        if workdir.primary:  # the others learnt the same one
            tokenizer.save(str(tokenizer_path))
    elif tokenizer_path.exists():
        tokenizer = load_tokenizer(tokenizer_path)
    else:
        raise ExperimentError(
            f"the checkpoint in {workdir.path} has no {TOKENIZER} beside it; add --restart"
        )
    train_x, lengths = encode(tokenizer, train_texts, config.max_len)
    test_x, _ = encode(tokenizer, test_texts, config.max_len)

    steps_per_epoch = n_train // config.batch_size
    test_data = common.eval_batches(mesh, min(EVAL_BATCH, n_test), test_x, test_y)

    chunk = common.chunk_length(steps_per_epoch, config.eval_every)
    tx, train_chunk, evaluate = compiled(
        dataclasses.replace(config, **UNCOMPILED), config.epochs * steps_per_epoch, chunk, mesh
    )
    params = init_params(config, tokenizer.get_vocab_size())
    state = common.replicate((params, tx.init(params)), mesh)
    state, at = common.resume(checkpoints, workdir, state, meta, config.epochs)
    print(
        f"{config.dataset}: {n_train} train / {n_test} test reviews; vocabulary of "
        f"{tokenizer.get_vocab_size()} tokens; median review {np.median(lengths):.0f} "
        f"tokens, {np.mean(lengths > config.max_len):.0%} cut to --max-len {config.max_len}; "
        f"bidirectional lstm {config.hidden_size}x{config.num_layers}, {config.pool} pooling, "
        f"{common.num_params(params)} parameters; {config.epochs} epochs of {steps_per_epoch} "
        f"steps on {common.device_name(mesh)}"
    )

    data_key, dropout_key = jax.random.split(jax.random.fold_in(jax.random.key(config.seed), 1))

    def epoch_steps(epoch: int):
        order = common.epoch_batches(data_key, epoch, n_train, steps_per_epoch, config.batch_size)
        data = tuple(common.shard_batches(mesh, order, train_x, train_y))

        def run(state, start: int, n: int):
            key = jax.random.fold_in(dropout_key, epoch * steps_per_epoch + start)
            state, (losses, accuracies) = train_chunk(state, start, n, data, key)
            return state, {"loss": losses, "accuracy": accuracies}

        return run

    def test_metrics(state) -> dict:
        loss_sum, correct, _ = evaluate(state[0], *test_data)
        return {"test_loss": float(loss_sum) / n_test, "test_accuracy": int(correct) / n_test}

    def plot_curves(records: list[dict]) -> None:
        common.plot_curves(
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

    state, at = common.train_epochs(
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
        plot=plot_curves,
    )

    if not workdir.primary:
        return {}
    records = workdir.metrics.records()
    summary = common.epoch_summary(config, at, records, state[0], mesh)
    summary |= {"train_accuracy": records[-1]["train_accuracy"],
                "vocab_size": tokenizer.get_vocab_size()}  # fmt: skip
    common.write_json(workdir / common.SUMMARY, summary)
    plot_curves(records)
    print(
        f"test accuracy {summary['test_accuracy']:.2%} after {config.epochs} epochs, "
        f"{summary['train_seconds']:.0f} s of training; wrote {workdir.path}"
    )
    return summary


if __name__ == "__main__":
    sys.exit(
        common.main(train, Config, description=__doc__, prog="python -m experiments.sentiment")
    )
