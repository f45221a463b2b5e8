"""Train stage: fits the CNN preset chosen by `train.model` on the prepared arrays.

Reads   params.yaml `train` and DATA/{x,y}_{train,val}.npy and DATA/dataset.json from
        prepare: the model takes the images' shape and has one output per class.
Writes  MODEL (native .keras file, recording its dataset and training settings) and
        LIVE/ (dvclive: per-epoch loss, accuracy, val_loss, val_accuracy as
        plots/metrics/{train,eval}/*.tsv with step = epoch, 1-based, and metrics.json).
        While training, CHECKPOINT/ holds a backup of the last finished epoch and a copy
        of LIVE/ up to it, so that a killed run resumes from there with its history (DVC
        deletes LIVE/ before rerunning the stage); a finished run deletes CHECKPOINT/.

Runs on whatever Keras finds: a GPU when one is visible (several -> MirroredStrategy),
else the CPU. Model code uses Keras 3 APIs only, so KERAS_BACKEND=jax works too.
"""

import argparse
import hashlib
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from stages import allocator, params
from stages.common import PipelineError, run_cli

allocator.preload(__name__)  # before any allocation worth speeding up


class Params(params.Section):
    section = "train"

    model: Literal["reference", "compact", "best", "fast"]  # a preset of stages/models.py
    seed: int = Field(ge=0)
    # "preset": the preset's own value (stages/models.py RECIPES). A word, not null: DVC's
    # `-S` rewrites every `null` in params.yaml as an empty value.
    epochs: Annotated[int, Field(ge=1)] | Literal["preset"]
    batch_size: Annotated[int, Field(ge=1)] | Literal["preset"]  # global: split across replicas
    learning_rate: Annotated[float, Field(gt=0)] | Literal["preset"]  # the (peak) rate
    label_smoothing: Annotated[float, Field(ge=0, lt=1)] | Literal["preset"]
    recolour: Literal["auto", True, False]  # colour images recoloured in training (models.py)
    mixed_precision: Literal["auto", "float32", "mixed_float16", "mixed_bfloat16"]
    jit_compile: Literal["auto", True, False]
    deterministic: bool
    distribute: Literal["auto", "none", "mirrored"]
    # Each feedback training image this many times per epoch, shuffled in; none: not used.
    feedback: Annotated[int, Field(ge=1)] | Literal["none"]


params.check_early(__name__, Params)

import keras
import numpy as np
import pandas as pd
from dvclive import Live
from dvclive.utils import standardize_metric_name

from stages import models
from stages.dataset import has_split, load_info, load_prepared
from stages.machine import cpu_has_bf16

FINGERPRINT = "fingerprint.json"
RECIPE_KEYS = ("epochs", "batch_size", "learning_rate", "label_smoothing")  # may say "preset"
SMALL_BATCH = 32  # the smallest batch a preset's own batch size shrinks to on few images
RECOLOURING = ("compact", "best")  # the presets that `train.recolour: auto` may recolour for


def list_gpus():
    """Names of the visible GPUs, whatever the Keras backend."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return [d.name for d in tf.config.list_physical_devices("GPU")]
    if backend == "jax":
        import jax

        return [str(d) for d in jax.devices() if d.platform == "gpu"]
    return []


def resolve_precision(setting, gpus, bf16_cpu):
    """`auto` -> mixed_float16 on GPUs (tensor cores); mixed_bfloat16 on a CPU with native
    bf16 (faster, same accuracy: README, "Presets, precision and speed"); else float32."""
    if setting != "auto":
        return setting
    if gpus:
        return "mixed_float16"
    return "mixed_bfloat16" if bf16_cpu and keras.backend.backend() == "tensorflow" else "float32"


def make_strategy(setting, gpus):
    """A tf.distribute strategy, or None for Keras' default (one device).

    `auto` mirrors over all GPUs when there are two or more. `mirrored` mirrors over
    every logical GPU, or every logical CPU when there is no GPU (used by tests).
    train.batch_size is the global batch: each of R replicas gets batch_size / R.
    """
    if setting == "none" or (setting == "auto" and len(gpus) < 2):
        return None
    if keras.backend.backend() != "tensorflow":
        raise PipelineError(
            f"train.distribute={setting} needs KERAS_BACKEND=tensorflow, "
            f"not {keras.backend.backend()}; set train.distribute: none"
        )
    import tensorflow as tf

    devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
    return tf.distribute.MirroredStrategy([d.name for d in devices])


def seed_everything(seed, deterministic):
    """Seeds every RNG; with `deterministic`, turns on TensorFlow's deterministic ops.

    Those stay on for the rest of the process: TensorFlow has no public switch back, and a
    stage trains once per process. A later `deterministic=False` in the same process (a
    benchmark's second run) still gets them."""
    keras.utils.set_random_seed(seed)  # Python, NumPy and backend RNGs
    if deterministic and keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()


def with_recipe(p, n_train):
    """p with each setting that says "preset" replaced by the preset's own for n_train
    training images, so that `-S train.model=X` alone is a sound run of preset X on any
    dataset. The recipes (stages/models.py) are sized for MNIST's 48,000 images; on fewer
    than 16 of its batches, the batch is a 16th of the images (32 at least) and the
    learning rate shrinks with it (docs/datasets.md, "Small datasets")."""
    recipe = models.RECIPES[p.model]
    own = {key: getattr(recipe, key) for key in RECIPE_KEYS if getattr(p, key) == "preset"}
    if "batch_size" in own:
        own["batch_size"] = min(recipe.batch_size, max(SMALL_BATCH, n_train // 16))
        if "learning_rate" in own:  # the same step per image: the linear scaling rule
            own["learning_rate"] *= own["batch_size"] / recipe.batch_size
    return p.model_copy(update=own)


def passes(p, n_train):
    """How many times an epoch goes over the n_train training images: 1, except where
    train.epochs is the preset's and one pass makes fewer optimizer steps than an epoch of
    the recipe on MNIST: then as many passes as make about as many steps."""
    if p.epochs != "preset":
        return 1
    batch_size = with_recipe(p, n_train).batch_size
    return max(1, round(models.RECIPES[p.model].steps_per_epoch * batch_size / n_train))


def colour_accuracy(x, y, folds=5, levels=4, most=2_000):
    """The share of images (at most `most` of x, evenly spaced) whose class their colours
    alone name: each image is its histogram of levels**3 colours, and is named after the
    nearest (L1) mean histogram of a class over the other folds' images."""
    x, y = x[:: max(1, len(x) // most)], y[:: max(1, len(y) // most)]
    n = len(x)
    level = np.minimum((x * levels).astype(np.int32), levels - 1)  # (n, h, w, 3)
    colour = (level[..., 0] * levels + level[..., 1]) * levels + level[..., 2]
    bins = colour.reshape(n, -1) + levels**3 * np.arange(n)[:, None]  # one range per image
    hist = np.bincount(bins.ravel(), minlength=n * levels**3).reshape(n, -1)
    fold = np.arange(n) % folds
    right = 0
    for f in range(folds):
        held, kept = fold == f, fold != f
        classes = np.unique(y[kept])
        means = np.stack([hist[kept & (y == c)].mean(axis=0) for c in classes])
        nearest = classes[np.abs(hist[held, None, :] - means).sum(axis=-1).argmin(axis=1)]
        right += int((nearest == y[held]).sum())
    return right / n


def check_recolour(p, channels):
    if p.recolour is True and channels != 3:
        raise PipelineError(
            "train.recolour is true but the images are grey (fetch.channels 1): only colour "
            "images can be recoloured; set train.recolour to auto or false"
        )


def recolours(p, x, y):
    """Whether training recolours the images x (labels y): as train.recolour says, and for
    auto, with compact and best on fewer colour images than their recipe is sized for
    when the colours alone tell the classes apart little better than chance (no more
    than a fifth of the way from chance to 100%), and so stand for nothing but the image."""
    check_recolour(p, x.shape[-1])
    if p.recolour != "auto":
        return p.recolour
    if x.shape[-1] != 3 or p.model not in RECOLOURING or len(x) >= models.MNIST_TRAIN:
        return False
    accuracy = colour_accuracy(x, y)
    chance = np.bincount(y).max() / len(y)
    recolour = bool(accuracy <= chance + 0.2 * (1 - chance))
    print(
        f"train: the colours alone name the class of {accuracy:.1%} of the training images "
        f"(chance {chance:.1%}): "
        + (
            "recoloured in training, so that the model learns the shapes (train.recolour)"
            if recolour
            else "kept, as they tell the classes apart (train.recolour)"
        )
    )
    return recolour


def fingerprint(p, data):
    """Identifies a training run (p as asked and as resolved for data), so a checkpoint is
    only resumed by the same run."""
    resolved = with_recipe(p, len(data["x_train"]))
    h = hashlib.sha256(json.dumps([p.model_dump(), resolved.model_dump()]).encode())
    h.update(keras.backend.backend().encode())
    for name in ("x_train", "y_train", "x_val", "y_val"):
        h.update(f"{name}{data[name].shape}".encode())
        h.update(np.ascontiguousarray(data[name][:: max(1, len(data[name]) // 256)]).tobytes())
    return h.hexdigest()


def can_resume(checkpoint_dir, fp):
    """True when checkpoint_dir holds a backup of this very run (same fingerprint)."""
    stamp = Path(checkpoint_dir) / FINGERPRINT
    backup = Path(checkpoint_dir) / "backup"
    return backup.exists() and stamp.exists() and json.loads(stamp.read_text()) == fp


def reset_checkpoint(checkpoint_dir, fp):
    """Empties checkpoint_dir of any other run's backup and stamps it with this run's."""
    checkpoint_dir = Path(checkpoint_dir)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    checkpoint_dir.mkdir(parents=True)
    (checkpoint_dir / FINGERPRINT).write_text(json.dumps(fp))


def resumed_epoch(checkpoint_dir):
    """The 0-based epoch that BackupAndRestore will resume from."""
    metadata = Path(checkpoint_dir) / "backup" / "training_metadata.json"
    return json.loads(metadata.read_text())["epoch"]


def compile_model(p, steps_per_epoch, input_shape, num_classes, recolour=False):
    model = models.build(p.model, input_shape, num_classes, recolour)
    model.compile(
        optimizer=models.optimizer(p.model, p.learning_rate, p.epochs * steps_per_epoch),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=p.label_smoothing),
        metrics=["accuracy"],
        jit_compile=p.jit_compile,  # "auto": XLA on GPU, not on a TF CPU (slower there)
    )
    return model


def train_model(data, p, callbacks=(), verbose="auto", num_classes=10):
    """Builds, compiles and fits preset p.model ("preset" settings: the preset's own) for
    data's image shape and `num_classes` classes; returns the trained model.

    verbose="auto": Keras' live progress bar on a terminal, one line per epoch otherwise
    (CI logs, `dvc exp run --queue`, a file)."""
    n_train = len(data["x_train"])
    recolour = recolours(p, data["x_train"], data["y_train"])
    repeat = passes(p, n_train)
    p = with_recipe(p, n_train)
    steps_per_epoch = math.ceil(repeat * n_train / p.batch_size)
    if repeat > 1:
        print(
            f"train: {n_train:,} training images, fewer than the {models.MNIST_TRAIN:,} the "
            f"{p.model} recipe is sized for: each epoch passes over them {repeat} times, "
            f"{steps_per_epoch} steps of batch {p.batch_size} at rate {p.learning_rate:g}"
        )
        data = {  # fit shuffles all the copies together, every epoch
            **data,
            "x_train": np.concatenate([data["x_train"]] * repeat),
            "y_train": np.concatenate([data["y_train"]] * repeat),
        }
    gpus = list_gpus()
    print(
        f"train: backend {keras.backend.backend()}, GPUs: {gpus or 'none, using the CPU'},"
        f" allocator {allocator.in_use()}"
    )
    seed_everything(p.seed, p.deterministic)
    policy = resolve_precision(p.mixed_precision, gpus, cpu_has_bf16())
    keras.mixed_precision.set_dtype_policy(policy)
    strategy = make_strategy(p.distribute, gpus)
    shape = data["x_train"].shape[1:]
    if strategy is None:
        model = compile_model(p, steps_per_epoch, shape, num_classes, recolour)
    else:
        print(f"train: MirroredStrategy over {strategy.num_replicas_in_sync} replicas")
        with strategy.scope():
            model = compile_model(p, steps_per_epoch, shape, num_classes, recolour)
    print(f"train: preset {p.model}, {model.count_params():,} parameters, precision {policy}")
    has_val = len(data["x_val"]) > 0
    if verbose == "auto":
        verbose = 1 if sys.stdout.isatty() else 2
    start = time.perf_counter()
    history = model.fit(
        data["x_train"],
        keras.utils.to_categorical(data["y_train"], num_classes),
        batch_size=p.batch_size,
        epochs=p.epochs,
        validation_data=(
            (data["x_val"], keras.utils.to_categorical(data["y_val"], num_classes))
            if has_val
            else None
        ),
        callbacks=list(callbacks),
        verbose=verbose,
    )
    print(f"train: fit took {time.perf_counter() - start:.2f} s")
    if history.history.get("val_accuracy"):  # none when resumed after the last epoch
        warning = verdict(history.history, data["y_val"])
        if warning:
            print(f"train: warning: {warning}")
    return model


def verdict(history, y_val):
    """One line when the last epoch's validation accuracy says the run went wrong: near
    chance (the largest class's share of the validation images), or far below the
    training accuracy (overfitting); None when neither."""
    val, fit = history["val_accuracy"][-1], history["accuracy"][-1]
    chance = np.bincount(y_val).max() / len(y_val)
    if fit - val > 0.2:
        return (
            f"validation accuracy {val:.1%} is far below the training accuracy {fit:.1%}: "
            "the model learned its training images rather than the classes. Add images, or "
            "try the best preset (augmentation)"
        )
    if val < chance + 0.1 * (1 - chance):
        return (
            f"validation accuracy {val:.1%} is near chance ({chance:.1%}): the model learned "
            "little. Try more epochs (train.epochs), a smaller train.batch_size or "
            "train.learning_rate, or more images per class"
        )
    return None


def settings_of(model, p, n_train):
    """What a trained model was trained with, `auto` and the preset's defaults resolved:
    recorded in the .keras file, because the run cache keys on params.yaml's words, so a
    model restored on another machine was trained where `auto` may have meant otherwise."""
    repeat = passes(p, n_train)
    p = with_recipe(p, n_train)
    strategy = getattr(model, "distribute_strategy", None)  # TensorFlow backend only
    return {
        "backend": keras.backend.backend(),
        "devices": list_gpus() or ["cpu"],
        "replicas": strategy.num_replicas_in_sync if strategy is not None else 1,
        "precision": model.dtype_policy.name,
        "jit_compile": bool(model.jit_compile),
        "deterministic": p.deterministic,
        "epochs": p.epochs,
        "passes_per_epoch": repeat,
        "batch_size": p.batch_size,
        "learning_rate": p.learning_rate,
        "label_smoothing": p.label_smoothing,
        "recolour": any(isinstance(layer, models.RandomRecolour) for layer in model.layers),
    }


class LogToLive(keras.callbacks.Callback):
    """dvclive's Keras callback without its `import tensorflow`, so that training under
    KERAS_BACKEND=jax needs no TensorFlow installed. After each epoch it also copies the
    history to `snapshot`, from where a resumed run restores it."""

    def __init__(self, live, snapshot):
        super().__init__()
        self.live = live
        self.snapshot = Path(snapshot)

    def on_epoch_end(self, epoch, logs=None):
        for name, value in (logs or {}).items():  # val_loss -> eval/loss, loss -> train/loss
            self.live.log_metric(standardize_metric_name(name, "dvclive.keras"), value)
        self.live.next_step()
        shutil.copytree(self.live.dir, self.snapshot, dirs_exist_ok=True)

    def on_train_end(self, logs=None):
        self.live.end()


def make_callbacks(live, checkpoint_dir):
    return [
        # Copies the history through epoch k before the backup of epoch k is written: a
        # run killed in between has one epoch too many, which restore_history drops.
        LogToLive(live, Path(checkpoint_dir) / "live"),
        keras.callbacks.BackupAndRestore(str(Path(checkpoint_dir) / "backup")),
    ]


def restore_history(checkpoint_dir, live_dir, epochs_done):
    """Puts the history of a killed run back in live_dir, through epoch `epochs_done`
    (1-based): DVC deletes train's outputs before it reruns the stage."""
    shutil.rmtree(live_dir, ignore_errors=True)
    snapshot = Path(checkpoint_dir) / "live"
    if not snapshot.exists():  # killed before its first epoch had been logged
        return
    shutil.copytree(snapshot, live_dir)
    for tsv in Path(live_dir).rglob("*.tsv"):
        rows = pd.read_csv(tsv, sep="\t")
        if (rows["step"] > epochs_done).any():
            rows[rows["step"] <= epochs_done].to_csv(tsv, sep="\t", index=False)


def load_feedback(prepared_dir):
    """The prepared feedback training part: {"x_feedback_train", "y_feedback_train"}."""
    if not has_split(prepared_dir, "feedback_train"):
        raise PipelineError(
            f"train.feedback is set but {prepared_dir} holds no feedback; set fetch.feedback to "
            "a folder of corrections (docs/feedback.md) or train.feedback: none"
        )
    return load_prepared(prepared_dir, splits=("feedback_train",))


def with_feedback(data, feedback, repeat):
    """data with each feedback training image `repeat` times after its training images
    (oversampling); fit shuffles them all in every epoch. Validation stays the dataset's."""
    x, y = feedback["x_feedback_train"], feedback["y_feedback_train"]
    if not len(y):
        raise PipelineError(
            "train.feedback is set but the feedback training part is empty; file more "
            "corrections or set train.feedback: none"
        )
    print(f"train: {len(y)} feedback training images, each {repeat} times per epoch")
    return {
        **data,
        "x_train": np.concatenate([data["x_train"], np.repeat(x, repeat, axis=0)]),
        "y_train": np.concatenate([data["y_train"], np.repeat(y, repeat)]),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="directory of prepared .npy arrays")
    parser.add_argument("--model", required=True, help="output .keras file")
    parser.add_argument("--live", required=True, help="dvclive output directory")
    parser.add_argument("--checkpoint", required=True, help="resume directory")
    args = parser.parse_args(argv)
    p = params.load(Params)
    data = load_prepared(args.data, splits=("train", "val"))
    if p.feedback != "none":
        data = with_feedback(data, load_feedback(args.data), p.feedback)
    info = load_info(args.data)
    check_recolour(p, data["x_train"].shape[-1])
    n_train = len(data["x_train"])
    fp = fingerprint(p, data)
    resume = can_resume(args.checkpoint, fp)
    epochs_done = resumed_epoch(args.checkpoint) if resume else 0
    if resume:
        print(f"train: resuming from the checkpoint in {args.checkpoint}")
        restore_history(args.checkpoint, args.live, epochs_done)
    else:
        reset_checkpoint(args.checkpoint, fp)
    live = Live(args.live, resume=resume, dvcyaml=None, save_dvc_exp=False, report=None)
    # dvclive's step is the epoch, 1-based like Keras' own log and curves.png; a resumed
    # run continues at the epoch Keras resumes from (dvclive alone would log a run killed
    # after its first epoch at step 1 twice).
    live.step = 1 + epochs_done
    model = train_model(
        data, p, make_callbacks(live, args.checkpoint), num_classes=len(info["classes"])
    )
    models.save_model(
        model,
        args.model,
        {"training": settings_of(model, p, n_train), "dataset": info},
    )
    # Finished: BackupAndRestore has deleted its backup; drop the stamp and the folder too,
    # so nothing from this run can leak into the next one.
    shutil.rmtree(args.checkpoint)
    print(f"train: saved {args.model}")


if __name__ == "__main__":
    run_cli(main)
