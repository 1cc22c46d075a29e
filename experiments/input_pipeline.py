"""Data: tfds' random-access sources, each epoch's shuffled batches, and their transfer to the
devices, each process sending only its own devices' share."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from experiments.cli import ExperimentError
from experiments.mesh import batch_sharded


def tfds_source(
    name: str,
    split: str,
    data_dir: str | None,
    *,
    check: Callable[[Any], str | None],
    alternatives: str,
):
    """tfds' random-access data source of a prepared dataset (ArrayRecord; no TensorFlow needed).

    ``check(features)`` returns why the dataset does not fit the program ("has images of shape
    ...", after "--dataset NAME"), or None;
    ``alternatives`` ends the unknown-name error ("pass --dataset mnist, ...").
    """
    import tensorflow_datasets as tfds

    try:  # the builder knows the features before any data is there
        features = tfds.builder(name, data_dir=data_dir).info.features
    except tfds.core.registered.DatasetNotFoundError:
        raise ExperimentError(f"tfds has no dataset named {name!r}; {alternatives}") from None
    problem = check(features)
    if problem:
        raise ExperimentError(f"--dataset {name} {problem}")
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception:  # not prepared in data_dir (tfds raises several kinds): prepare it
        pass
    where = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    hint = "point --data-dir (or TFDS_DATA_DIR) at a directory where it is prepared"
    if importlib.util.find_spec("tensorflow") is None:
        raise ExperimentError(
            f"tfds found no prepared {name!r} in {where}, and preparing it needs TensorFlow "
            f"(pip install 'jlstm[prepare]') and internet; or {hint}"
        )
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=True)
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ExperimentError(
            f"tfds could not download and prepare {name!r} in {where} ({reason}); "
            f"without internet, {hint}"
        ) from None


def read_all(source) -> list[dict]:
    """Every example of a tfds data source, as a list of feature dicts."""
    try:
        return source.__getitems__(range(len(source)))  # one batched read
    except TypeError:  # tfds.testing.mock_data's source lacks a working __getitems__
        return [source[i] for i in range(len(source))]


def pad_to_batches(x: np.ndarray, labels: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``x`` padded with zeros and ``labels`` with -1 to a multiple of ``size`` examples."""
    pad = -len(labels) % size
    x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
    return x, np.concatenate([labels, np.full(pad, -1, labels.dtype)])


def epoch_batches(key: jax.Array, epoch: int, n: int, steps: int, batch_size: int) -> np.ndarray:
    """An epoch's shuffled example indices, ``(steps, batch_size)``; the same on every process."""
    order = np.asarray(jax.random.permutation(jax.random.fold_in(key, epoch), n))
    return order[: steps * batch_size].reshape(steps, batch_size)


def shard_batches(mesh: Mesh, indices: np.ndarray, *arrays: np.ndarray) -> list[jax.Array]:
    """``array[indices]`` of each host array, ``(steps, batch, ...)``, the batch split over the
    devices of ``mesh``: each process reads only the examples its own devices hold.

    ``indices`` is ``(steps, batch)``, the example indices of each step's batch.
    """
    sharding = batch_sharded(mesh)

    def gather(array: np.ndarray) -> jax.Array:
        shape = indices.shape + array.shape[1:]
        return jax.make_array_from_callback(
            shape, sharding, lambda index: array[indices[index[:2]]]
        )

    return [gather(array) for array in arrays]


def eval_batches(mesh: Mesh, batch: int, x: np.ndarray, labels: np.ndarray) -> list[jax.Array]:
    """A test set as ``(batches, batch, ...)`` device arrays, the batch split over ``mesh``
    (``batch`` rounded up to a multiple of its size); padded examples carry label -1."""
    batch = -(-batch // mesh.size) * mesh.size
    x, labels = pad_to_batches(x, labels, batch)
    return shard_batches(mesh, np.arange(len(labels)).reshape(-1, batch), x, labels)


# ------------------------------------------------------------------------------------------ text

PAD, UNK = "[PAD]", "[UNK]"  # special tokens; PAD gets id 0, so lengths are ``tokens != 0``


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
