"""Row-by-row MNIST: an LSTM reads each 28x28 image as 28 rows of 28 pixels (the PyTorch tutorial).

    make train-mnist                                  # defaults below; writes runs/mnist/
    make train-mnist ARGS="--hidden-size 64 --epochs 1 --batch-size 64 --lr 0.01"   # the tutorial's
    python -m experiments.mnist --dataset fashion_mnist --data-dir ../shared/tensorflow_datasets
    XLA_FLAGS=--xla_force_host_platform_device_count=8 make train-mnist   # 8 CPU devices

The model is ``jlstm.lstm`` (``batch_first``) and a linear layer on the last hidden state
``h_n[-1]``; softmax cross-entropy, Adam from optax. Data comes through tfds' ArrayRecord data
source (no TensorFlow needed). Training is data-parallel over all visible devices (``--devices
N``), and over several hosts when launched with ``jax.distributed`` (``--distributed``, or
``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``): each epoch is
shuffled, and each device receives its share of every batch of the epoch at once; parameters and
optimizer state are replicated, and each chunk of training steps is one jitted ``lax.scan`` in
which XLA sums the devices' gradients. The results do not depend on the number of devices (up to
float rounding). The work dir gets ``metrics.jsonl``, ``summary.json``, ``curves.png``,
``predictions.png`` and an orbax checkpoint per epoch; rerunning the same command resumes from
it (on any number of devices), ``--restart`` starts over.
"""

from __future__ import annotations

import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import cli, input_pipeline, models, plots, training
from experiments.cli import option, shared
from experiments.mesh import data_mesh, device_name, start_distributed
from experiments.workdir import (
    Checkpoints,
    Workdir,
    run_in_workdir,
    saved_meta,
)

IMAGE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10
EVAL_BATCH = 1000  # test images per forward pass in evaluation (bounds its memory)
SHOWN = 20  # test digits drawn in predictions.png


@dataclasses.dataclass(frozen=True)
class Config:
    dataset: str = option("mnist", "tfds dataset of 28x28 grayscale images in 10 classes: "
                          "mnist, fashion_mnist, kmnist")  # fmt: skip
    data_dir: str | None = shared("data_dir")
    cell: str = option("lstm", "recurrent layer", choices=models.CELLS)
    hidden_size: int = option(128, "hidden units per layer", type=cli.positive_int)
    num_layers: int = option(1, "stacked recurrent layers", type=cli.positive_int)
    bidirectional: bool = option(False, "read the rows both ways and join both final states")
    epochs: int = option(6, "passes over the training set", type=cli.positive_int)
    batch_size: int = option(64, "images per training step", type=cli.positive_int)
    lr: float = option(0.003, "peak learning rate of Adam", type=cli.positive_float)
    schedule: str = shared("schedule")
    grad_clip: float = shared("grad_clip")
    eval_every: int = shared("eval_every")
    seed: int = option(0, "seed of the initial weights and of the shuffling",
                       type=cli.nonnegative_int)  # fmt: skip
    workdir: str = option("runs/mnist", "directory for metrics, plots and checkpoints")
    restart: bool = shared("restart")
    keep_checkpoints: int = shared("keep_checkpoints")
    devices: int = shared("devices")
    distributed: bool = shared("distributed")


# ------------------------------------------------------------------------------------------ data


def load(name: str, split: str, data_dir: str | None):
    """``(images, labels, label_names)``: uint8 ``(N, 28, 28)``, int32 ``(N,)``, numpy arrays."""
    source = input_pipeline.tfds_source(
        name,
        split,
        data_dir,
        check=_check_features,
        alternatives="pass --dataset mnist, fashion_mnist or kmnist",
    )
    examples = input_pipeline.read_all(source)
    images = np.stack([ex["image"][..., 0] for ex in examples])
    labels = np.array([ex["label"] for ex in examples], dtype=np.int32)
    return images, labels, list(source.dataset_info.features["label"].names)


def _check_features(features) -> str | None:
    image_shape = tuple(features["image"].shape) if "image" in features else None
    num_classes = getattr(features["label"], "num_classes", None) if "label" in features else None
    if image_shape != IMAGE_SHAPE or num_classes != NUM_CLASSES:
        return (
            f"has images of shape {image_shape} in {num_classes} classes, but this program "
            "reads 28x28 grayscale images in 10 classes (mnist, fashion_mnist, kmnist)"
        )
    return None


# ----------------------------------------------------------------------------------------- model


def logits_fn(config: Config, params: dict, images: jax.Array) -> jax.Array:
    """``(N, 10)`` logits of uint8 ``(N, 28, 28)`` images, read row by row."""
    x = images.astype(jnp.float32) / 255.0
    _, state = models.recurrent(config.cell, params, x, batch_first=True)
    return models.head(
        params, models.last_hidden(config.cell, state, bidirectional=config.bidirectional)
    )


def init_params(config: Config) -> dict:
    return models.init(
        jax.random.key(config.seed),
        config.cell,
        IMAGE_SHAPE[1],
        config.hidden_size,
        NUM_CLASSES,
        num_layers=config.num_layers,
        bidirectional=config.bidirectional,
    )


# Fields that the compiled functions do not depend on (see training.compiled).
UNCOMPILED = {"dataset": "", "data_dir": None, "eval_every": 0, "seed": 0, "workdir": "",
              "restart": False, "keep_checkpoints": 0, "devices": 0, "distributed": False}  # fmt: skip


def make_step(config: Config, tx: optax.GradientTransformation):
    """``step(state, (images, labels), key) -> (state, loss)``: one Adam step on a batch."""

    def loss_fn(params, images, labels):
        logits = logits_fn(config, params, images)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    def step(state, batch, key):
        params, opt_state = state
        loss, grads = jax.value_and_grad(loss_fn)(params, *batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    return step


# -------------------------------------------------------------------------------------- training


def train(config: Config) -> dict:
    """Trains (or resumes) as ``config`` says, writes the work dir, returns the summary."""
    start_distributed(config.distributed)
    return run_in_workdir(config, _train)


def _train(config: Config, workdir: Workdir, checkpoints: Checkpoints) -> dict:
    meta = saved_meta(checkpoints, config, free=cli.RESUMABLE_CHANGES)
    mesh = data_mesh(config.devices)
    train_x, train_y, _ = load(config.dataset, "train", config.data_dir)
    test_x, test_y, label_names = load(config.dataset, "test", config.data_dir)
    n_train, n_test = len(train_y), len(test_y)
    steps_per_epoch = training.steps_per_epoch(config, n_train, "examples", mesh)
    test_data = input_pipeline.eval_batches(mesh, EVAL_BATCH, test_x, test_y)
    params = init_params(config)
    train_chunk, evaluate, chunk, state, at = training.start(
        config, UNCOMPILED, logits_fn, make_step, steps_per_epoch, params, mesh,
        (checkpoints, workdir, meta),
    )  # fmt: skip
    print(
        f"{config.dataset}: {n_train} train / {n_test} test images; {config.cell} "
        f"{config.hidden_size}x{config.num_layers}, {training.num_params(params)} parameters; "
        f"{config.epochs} epochs of {steps_per_epoch} steps on {device_name(mesh)}"
    )

    data_key = jax.random.fold_in(jax.random.key(config.seed), 1)

    def epoch_steps(epoch: int):
        order = input_pipeline.epoch_batches(
            data_key, epoch, n_train, steps_per_epoch, config.batch_size
        )
        data = tuple(input_pipeline.shard_batches(mesh, order, train_x, train_y))

        def run(state, start: int, n: int):
            state, losses = train_chunk(state, start, n, data, None)
            return state, {"loss": losses}

        return run

    predictions = None  # of the latest evaluation

    def test_metrics(state) -> dict:
        nonlocal predictions
        loss_sum, correct, predictions = evaluate(state[0], *test_data)
        return {"test_loss": float(loss_sum) / n_test, "test_accuracy": int(correct) / n_test}

    def write_curves(records: list[dict]) -> None:
        plots.plot_curves(
            workdir / "curves.png",
            records,
            [
                (("train_loss", "test_loss"), "cross-entropy", "log"),
                ("test_accuracy", "test accuracy", "percent"),
            ],
            title=f"{config.dataset}: {config.cell} {config.hidden_size}, row by row",
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
        unit="ex",
        plot=write_curves,
    )
    if predictions is None:  # a finished run, rerun: nothing was trained or evaluated
        _, _, predictions = evaluate(state[0], *test_data)
    if not workdir.primary:
        return {}

    summary = training.finish(config, at, state, mesh, workdir, write_curves)
    accuracy = summary["test_accuracy"]
    plot_predictions(
        workdir / "predictions.png",
        test_x[:SHOWN],
        test_y[:SHOWN],
        np.asarray(predictions)[:SHOWN],
        label_names,
        title=f"{config.dataset} test images: predicted / true "
        f"(accuracy {accuracy:.2%} on all {n_test})",
    )
    return summary


def plot_predictions(path, images, labels, predictions, names, *, title: str) -> None:
    """The first test images, each titled ``predicted / true`` (red where they differ)."""
    plt = plots.pyplot()
    cols = 10
    rows = -(-len(labels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.55 * rows + 0.5), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, label, pred in zip(axes.flat, images, labels, predictions, strict=False):
        ax.imshow(image, cmap="gray_r")
        ax.set_title(
            f"{names[pred]} / {names[label]}",
            fontsize=9,
            color="black" if pred == label else "red",
        )
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(cli.main(train, Config, description=__doc__, prog="python -m experiments.mnist"))
