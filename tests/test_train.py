"""The train stage on tiny synthetic data: presets, resume, determinism, devices, backends."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
import yaml

from stages import models, train
from tests.conftest import MNIST_INFO, ROOT, extras, make_prepared, run_stage, write_params


def train_args(root):
    args = [
        "--data",
        root / "prepared",
        "--model",
        root / "model" / "model.keras",
        "--live",
        root / "live",
        "--checkpoint",
        root / "checkpoint",
    ]
    return [str(a) for a in args]


def logged_epochs(live_dir):
    return pd.read_csv(live_dir / "plots" / "metrics" / "train" / "loss.tsv", sep="\t")[
        "step"
    ].tolist()


def test_reference_model_has_the_tutorials_parameter_count():
    model = models.build("reference")
    assert model.count_params() == 2_435_210
    assert [layer.__class__.__name__ for layer in model.layers] == [
        "Conv2D",
        "Conv2D",
        "MaxPooling2D",
        "Dropout",
        "Flatten",
        "Dense",
        "Dropout",
        "Dense",
    ]


@pytest.mark.slow
@pytest.mark.parametrize("preset", list(models.BUILDERS))
def test_each_preset_learns_with_its_own_recipe_from_one_override(workdir, preset):
    # `-S train.model=X` (and a few epochs, or the recipe's steps would take minutes):
    # batch size, learning rate and label smoothing stay "preset" in params.yaml, so each
    # preset trains with its own. 16 batches of data: no small-data shrinking.
    recipe = models.RECIPES[preset]
    make_prepared(workdir / "prepared", n_train=16 * recipe.batch_size)
    write_params(workdir / "params.yaml", train__model=preset, train__epochs=3)
    assert (
        yaml.safe_load((workdir / "params.yaml").read_text())["train"]["learning_rate"] == "preset"
    )
    train.main(train_args(workdir))
    history = pd.read_csv(workdir / "live/plots/metrics/train/accuracy.tsv", sep="\t")
    assert history["step"].tolist() == [1, 2, 3]
    # Chance is 10%; each class is a bright patch at its own place, easy to learn. Held-out
    # accuracy on the test split, except for best: its random shifts move the patch that
    # codes the class, so its training accuracy, as logged, says more.
    model = models.load_model(workdir / "model" / "model.keras")
    probs = model.predict(np.load(workdir / "prepared" / "x_test.npy"), verbose=0)
    held_out = float(np.mean(probs.argmax(axis=1) == np.load(workdir / "prepared/y_test.npy")))
    learned = history["accuracy"].iloc[-1] if preset == "best" else held_out
    assert learned >= 0.5, f"{preset} did not learn: held out {held_out}, {history}"
    # The .keras file says what the run resolved: the preset's recipe, the precision.
    settings = models.recorded(workdir / "model" / "model.keras", "training")
    assert (
        settings["epochs"],
        settings["batch_size"],
        settings["learning_rate"],
        settings["label_smoothing"],
    ) == (3, recipe.batch_size, recipe.learning_rate, recipe.label_smoothing)
    weighted = next(layer for layer in model.layers if layer.weights)
    assert settings["precision"] == weighted.dtype_policy.name
    assert models.recorded(workdir / "model" / "model.keras", "dataset") == MNIST_INFO
    assert settings["precision"] == ("mixed_bfloat16" if train.cpu_has_bf16() else "float32")


def resolved(n_train, **asked):
    """(epochs, passes per epoch, batch size, learning rate, label smoothing) of a run on
    n_train images with params.yaml's train section and `asked`."""
    write_params(Path("params.yaml"), **{f"train__{k}": v for k, v in asked.items()})
    p = train.params.load(train.Params)
    resolved = train.with_recipe(p, n_train)
    return (
        resolved.epochs,
        train.passes(p, n_train),
        resolved.batch_size,
        resolved.learning_rate,
        resolved.label_smoothing,
    )


def test_a_preset_s_epoch_makes_its_recipe_s_steps_whatever_the_dataset_s_size(workdir):
    for name, r in models.RECIPES.items():  # MNIST: the recipe as it is
        mnist = (r.epochs, 1, r.batch_size, r.learning_rate, r.label_smoothing)
        assert resolved(48_000, model=name) == mnist
    assert models.RECIPES["compact"].steps_per_epoch == 375
    # 192 images: batches of 32 (the floor; a 16th would be 12) at a quarter of the rate,
    # each epoch 62 passes: 372 steps.
    assert resolved(192, model="compact") == (6, 62, 32, 0.00125, 0.0)
    epochs, repeat, batch, rate, _ = resolved(1_150, model="compact")  # a 16th: 71
    assert (epochs, repeat, batch, rate) == (6, 23, 71, pytest.approx(0.005 * 71 / 128))
    assert resolved(60_000, model="fast")[:3] == (1, 1, 512)  # 118 steps: more than 94
    assert resolved(40_000, model="compact")[:3] == (6, 1, 128)  # 313 steps: about 375
    # A number overrides the recipe, and the other settings adapt to it.
    assert resolved(192, model="compact", epochs=5) == (5, 1, 32, 0.00125, 0.0)
    assert resolved(192, model="compact", batch_size=64) == (6, 125, 64, 0.005, 0.0)
    assert resolved(192, model="compact", learning_rate=0.01) == (6, 62, 32, 0.01, 0.0)
    assert resolved(192, model="fast", label_smoothing=0) == (1, 16, 32, 0.000625, 0.0)


def test_saving_the_same_weights_twice_gives_the_same_bytes(tmp_path):
    model = models.build("compact")
    models.save_model(model, tmp_path / "a.keras")
    time.sleep(1.1)  # Keras stamps the save time to the second
    models.save_model(model, tmp_path / "b.keras")
    assert (tmp_path / "a.keras").read_bytes() == (tmp_path / "b.keras").read_bytes()
    reloaded = models.load_model(tmp_path / "b.keras")
    assert all(
        np.array_equal(a, b)
        for a, b in zip(model.get_weights(), reloaded.get_weights(), strict=True)
    )


class StopAfterFirstEpoch(keras.callbacks.Callback):
    """Simulates Ctrl-C (or a preempted runner) right after epoch 1 has been backed up."""

    def on_epoch_end(self, epoch, logs=None):
        raise KeyboardInterrupt


class RecordEpochs(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.started = []

    def on_epoch_begin(self, epoch, logs=None):
        self.started.append(epoch)


def with_callback(monkeypatch, callback):
    """Adds `callback` to the ones train.main() passes to fit()."""
    make = train.make_callbacks
    monkeypatch.setattr(train, "make_callbacks", lambda *args: [*make(*args), callback])


@pytest.mark.slow
def test_killed_training_resumes_from_the_last_finished_epoch(workdir, capsys, monkeypatch):
    make_prepared(workdir / "prepared")
    write_params(workdir / "params.yaml", train__epochs=3, train__batch_size=32)
    with monkeypatch.context() as m:
        with_callback(m, StopAfterFirstEpoch())
        with pytest.raises(KeyboardInterrupt):
            train.main(train_args(workdir))
    assert (workdir / "checkpoint" / "backup").is_dir()
    assert not (workdir / "model" / "model.keras").exists()
    shutil.rmtree(workdir / "live")  # as DVC does before it reruns the stage

    recorder = RecordEpochs()
    with_callback(monkeypatch, recorder)
    train.main(train_args(workdir))
    assert "resuming from the checkpoint" in capsys.readouterr().out
    assert recorder.started == [1, 2]  # Keras' 0-based epochs: the 2nd and 3rd of 3
    assert logged_epochs(workdir / "live") == [1, 2, 3]
    assert (workdir / "model" / "model.keras").exists()
    assert not (workdir / "checkpoint").exists()  # nothing left to leak


def test_restored_history_ends_at_the_epoch_training_resumes_from(tmp_path):
    """A run killed after logging epoch 3 but before backing it up resumes after epoch 2."""
    snapshot = tmp_path / "checkpoint" / "live" / "plots" / "metrics" / "train"
    snapshot.mkdir(parents=True)
    rows = "timestamp\tstep\tloss\n" + "".join(f"{i}\t{i}\t0.{i}\n" for i in (1, 2, 3))
    (snapshot / "loss.tsv").write_text(rows)
    (tmp_path / "live").mkdir()
    (tmp_path / "live" / "stale.tsv").write_text("of another run")
    train.restore_history(tmp_path / "checkpoint", tmp_path / "live", epochs_done=2)
    assert logged_epochs(tmp_path / "live") == [1, 2]
    assert not (tmp_path / "live" / "stale.tsv").exists()


@pytest.mark.slow
def test_checkpoint_of_a_run_with_other_params_is_discarded(workdir, capsys, monkeypatch):
    make_prepared(workdir / "prepared")
    write_params(workdir / "params.yaml", train__epochs=2, train__batch_size=32)
    with monkeypatch.context() as m:
        with_callback(m, StopAfterFirstEpoch())
        with pytest.raises(KeyboardInterrupt):
            train.main(train_args(workdir))
    write_params(workdir / "params.yaml", train__epochs=2, train__batch_size=16)
    recorder = RecordEpochs()
    with_callback(monkeypatch, recorder)
    train.main(train_args(workdir))
    assert "resuming" not in capsys.readouterr().out
    assert recorder.started == [0, 1]
    assert logged_epochs(workdir / "live") == [1, 2]


def weights_after_training(workdir, seed):
    write_params(
        workdir / "params.yaml",
        train__epochs=1,
        train__batch_size=32,
        train__seed=seed,
        train__deterministic=True,
    )
    train.main(train_args(workdir))
    return models.load_model(workdir / "model" / "model.keras").get_weights()


@pytest.mark.slow
def test_deterministic_runs_are_identical_and_seeds_matter(workdir):
    make_prepared(workdir / "prepared")
    first = weights_after_training(workdir, seed=1)
    again = weights_after_training(workdir, seed=1)
    other = weights_after_training(workdir, seed=2)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=False))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=False))


# Whether TensorFlow's deterministic ops are on, by a public call that they refuse.
DETERMINISM = """
import sys, tensorflow as tf
from stages import train
train.seed_everything(0, deterministic=sys.argv[1] == "on")
try:
    tf.random.Generator.from_non_deterministic_state()
    print("off")
except RuntimeError:  # "cannot be called when determinism is enabled"
    print("on")
"""


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["on", "off"])
def test_deterministic_turns_on_tensorflows_deterministic_ops(setting):
    # In a process of its own: once on, they stay on for the rest of the process.
    result = subprocess.run(
        [sys.executable, "-c", DETERMINISM, setting],
        env={**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout == f"{setting}\n"


def test_precision_auto_picks_the_fast_type_per_device():
    assert (
        train.resolve_precision("auto", ["/physical_device:GPU:0"], bf16_cpu=False)
        == "mixed_float16"
    )
    assert train.resolve_precision("auto", [], bf16_cpu=False) == "float32"
    assert train.resolve_precision("float32", [], bf16_cpu=True) == "float32"
    if keras.backend.backend() == "tensorflow":
        assert train.resolve_precision("auto", [], bf16_cpu=True) == "mixed_bfloat16"


MIRRORED = """
import sys, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from stages import train
train.main(sys.argv[1:])
"""


@pytest.mark.slow
def test_mirrored_strategy_trains_on_two_logical_cpus(workdir):
    import subprocess
    import sys

    from tests.conftest import ROOT

    make_prepared(workdir / "prepared")
    write_params(
        workdir / "params.yaml", train__epochs=1, train__batch_size=32, train__distribute="mirrored"
    )
    result = subprocess.run(
        [sys.executable, "-c", MIRRORED, *map(str, train_args(workdir))],
        cwd=workdir,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MirroredStrategy over 2 replicas" in result.stdout
    run_stage(
        "evaluate",
        "--model",
        workdir / "model" / "model.keras",
        "--data",
        workdir / "prepared",
        "--live",
        workdir / "live",
        "--out",
        workdir / "eval",
        cwd=workdir,
    )
    metrics = json.loads((workdir / "eval" / "metrics.json").read_text())
    probs = models.load_model(workdir / "model" / "model.keras").predict(
        np.load(workdir / "prepared" / "x_test.npy"), verbose=0
    )
    labels = np.load(workdir / "prepared" / "y_test.npy")
    assert metrics["accuracy"] == float(np.mean(probs.argmax(axis=1) == labels))
    # What the run resolved travels with the model, and evaluate reports its precision.
    settings = models.recorded(workdir / "model" / "model.keras", "training")
    assert (settings["replicas"], settings["devices"], settings["epochs"]) == (2, ["cpu"], 1)
    expected = "mixed_bfloat16" if train.cpu_has_bf16() else "float32"
    assert settings["precision"] == metrics["dtype_policy"] == expected


@pytest.mark.slow
def test_train_stage_runs_on_the_jax_backend(workdir):
    env = {"KERAS_BACKEND": "jax", "PYTHONPATH": os.pathsep.join([str(ROOT), extras("jax")])}
    make_prepared(workdir / "prepared")
    write_params(workdir / "params.yaml", train__epochs=1, train__batch_size=32)
    result = run_stage("train", *train_args(workdir), env=env, cwd=workdir)
    assert "backend jax" in result.stdout
    assert (workdir / "model" / "model.keras").exists()
    assert logged_epochs(workdir / "live") == [1]


def test_jit_compile_auto_keeps_xla_off_on_a_tensorflow_cpu(workdir):
    if keras.backend.backend() != "tensorflow" or train.list_gpus():
        pytest.skip("the rule under test is for TensorFlow on a CPU")
    write_params(workdir / "params.yaml")
    p = train.params.load(train.Params)
    assert p.jit_compile == "auto"
    assert train.compile_model(train.with_recipe(p, 480), 1, (28, 28, 1), 10).jit_compile is False


def test_shared_object_ids_are_renumbered_in_order_of_appearance():
    config = {"a": {"shared_object_id": 140}, "b": [{"shared_object_id": 7}, {"x": 140}]}
    config["b"].append({"shared_object_id": 140})
    assert models.renumber_shared_objects(config) == {
        "a": {"shared_object_id": 1},
        "b": [{"shared_object_id": 2}, {"x": 140}, {"shared_object_id": 1}],
    }


def test_a_run_near_chance_or_far_below_its_training_accuracy_says_so_in_one_line():
    y_val = np.array([0, 0, 1, 1, 2, 2, 2, 2])  # the largest class: half
    near_chance = train.verdict({"accuracy": [0.6, 0.6], "val_accuracy": [0.4, 0.52]}, y_val)
    assert near_chance.startswith("validation accuracy 52.0% is near chance (50.0%)")
    assert "train.epochs" in near_chance and "\n" not in near_chance
    overfit = train.verdict({"accuracy": [1.0], "val_accuracy": [0.7]}, y_val)
    assert overfit.startswith("validation accuracy 70.0% is far below the training accuracy")
    assert "best preset" in overfit
    assert train.verdict({"accuracy": [0.99], "val_accuracy": [0.9]}, y_val) is None


def test_recolouring_gives_each_image_its_channels_reordered_and_inverted_in_training_only(
    tmp_path,
):
    images = np.random.default_rng(0).uniform(size=(64, 5, 4, 3)).astype(np.float32)
    layer = models.RandomRecolour(seed=1)
    assert np.array_equal(np.asarray(layer(images, training=False)), images)
    recoloured = np.asarray(layer(images, training=True))
    seen = set()
    for source, out in zip(images, recoloured, strict=True):
        candidates = [source[..., c] for c in range(3)] + [1 - source[..., c] for c in range(3)]
        picks = [
            next(i for i, c in enumerate(candidates) if np.allclose(out[..., k], c, atol=1e-6))
            for k in range(3)
        ]
        assert sorted(p % 3 for p in picks) == [0, 1, 2]  # each channel once
        seen.add(tuple(picks))
    assert len(seen) > 20  # of the 48 colourings
    # Asked for: the first layer, saved and loaded with the model; else no preset has it.
    best = models.build("best", (16, 16, 3), 3, recolour=True)
    assert isinstance(best.layers[0], models.RandomRecolour)
    models.save_model(best, tmp_path / "best.keras")
    loaded = models.load_model(tmp_path / "best.keras")
    assert [type(layer) for layer in loaded.layers] == [type(layer) for layer in best.layers]
    for name in models.BUILDERS:
        built = models.build(name, (28, 28, 3), 3)
        assert not any(isinstance(layer, models.RandomRecolour) for layer in built.layers)


def single_colours(colours_by_class, repeat=5):
    """Images of 2x2 pixels of one colour each: `repeat` of each colour of each class."""
    x = np.array([[c] * 4 for cs in colours_by_class for c in cs for _ in range(repeat)])
    y = np.array([k for k, cs in enumerate(colours_by_class) for _ in cs for _ in range(repeat)])
    return x.reshape(-1, 2, 2, 3).astype(np.float32), y


RED, GREEN, BLUE, GREY = (0.9, 0.1, 0.1), (0.1, 0.9, 0.1), (0.1, 0.1, 0.9), (0.5, 0.5, 0.5)


def test_colour_accuracy_is_the_share_of_images_their_colours_alone_name():
    # Each class its own colours: every held-out image is nearest its own class's mean.
    assert train.colour_accuracy(*single_colours([[RED, GREEN], [BLUE, GREY]])) == 1.0
    # Both classes in the same colours, in the same order: the class means are equal, and a
    # tie names the first class, which is right for half of the images.
    assert train.colour_accuracy(*single_colours([[RED, BLUE], [RED, BLUE]])) == 0.5


def test_auto_recolours_compact_and_best_on_small_colour_data_whose_colours_say_nothing(
    workdir, capsys
):
    write_params(Path("params.yaml"))
    p = train.params.load(train.Params)
    assert p.recolour == "auto"
    say_nothing = single_colours([[RED, BLUE, GREEN], [GREEN, RED, BLUE]])
    name_the_class = single_colours([[RED, GREEN], [BLUE, GREY]])
    compact = p.model_copy(update={"model": "compact"})
    best = p.model_copy(update={"model": "best"})
    assert train.recolours(compact, *say_nothing) is True
    assert capsys.readouterr().out == (
        "train: the colours alone name the class of 50.0% of the training images (chance "
        "50.0%): recoloured in training, so that the model learns the shapes (train.recolour)\n"
    )
    assert train.recolours(best, *name_the_class) is False
    kept = "kept, as they tell the classes apart (train.recolour)\n"
    assert capsys.readouterr().out.endswith(kept)
    # Not the other presets, nor grey images, nor as many images as a recipe is sized for.
    assert train.recolours(p.model_copy(update={"model": "fast"}), *say_nothing) is False
    x, y = say_nothing
    assert train.recolours(compact, x[..., :1], y) is False
    many = np.resize(x, (models.MNIST_TRAIN, 2, 2, 3)), np.resize(y, models.MNIST_TRAIN)
    assert train.recolours(compact, *many) is False
    assert capsys.readouterr().out == ""
    # true and false are obeyed; true on grey images is one line.
    assert train.recolours(p.model_copy(update={"recolour": True}), *name_the_class) is True
    assert train.recolours(compact.model_copy(update={"recolour": False}), *say_nothing) is False
    with pytest.raises(train.PipelineError) as error:
        train.recolours(p.model_copy(update={"recolour": True}), x[..., :1], y)
    assert str(error.value) == (
        "train.recolour is true but the images are grey (fetch.channels 1): only colour images "
        "can be recoloured; set train.recolour to auto or false"
    )
