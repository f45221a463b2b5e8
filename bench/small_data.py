"""Presets on small folders of your own kind of images: test accuracy when only
`fetch.source`, `fetch.image_size`, `fetch.channels` and `train.model` are given.

    python -m bench.small_data [--presets compact best] [--datasets NAME ...] [--seed 42]

Each dataset is written by tools.shapes into a temporary folder, then fetched, prepared
(params.yaml's fetch and prepare sections: 20% held out for testing, 20% of the rest for
validation) and trained by the train stage's own functions with params.yaml's train
section and `train.model` set: everything else `preset`. Prints the machine line, then one
line per run: the data, the recipe the run resolved, validation and test accuracy, chance
(the largest class's share of the test images) and the fit's seconds.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import load_params, print_machine
from stages import fetch, prepare, train
from stages.common import run_cli
from stages.evaluate import compute_metrics
from tools.shapes import write_shapes

# name: (write_shapes arguments, fetch.image_size, fetch.channels)
DATASETS = {
    "shapes3-colour": ({"shapes": ("circle", "square", "triangle"), "per_class": 100}, 32, 3),
    "shapes4-colour-small": (
        {"shapes": ("circle", "cross", "ring", "star"), "per_class": 50},
        24,
        3,
    ),
    "shapes3-8colours": (
        {"shapes": ("circle", "square", "triangle"), "per_class": 100, "colours": 8},
        32,
        3,
    ),
    "shapes3-grey": (
        {"shapes": ("circle", "square", "triangle"), "per_class": 100, "grey": True},
        32,
        1,
    ),
    # Classes that are colours (any of three shapes): colour must not be recoloured away.
    "colours3": ({"by_colour": ("red", "green", "blue"), "per_class": 100}, 32, 3),
}


def run(name, preset, seed, root):
    """One dataset through fetch, prepare and train; returns the printed line."""
    shapes, side, channels = DATASETS[name]
    images = write_shapes(root / name, size=64, seed=seed, **shapes)
    (root / "no-feedback").mkdir(exist_ok=True)
    fp = load_params(
        fetch.Params,
        source=str(images),
        feedback=str(root / "no-feedback"),
        image_size=[side, side],
        channels=channels,
    )
    raw = root / f"{name}-raw"
    classes, _ = fetch.fetch_folder(images, raw, fp)
    pp = load_params(prepare.Params)
    _, arrays, _ = prepare.load_raw(raw)
    data = prepare.prepare(*arrays, pp.train_size, pp.validation_split, pp.test_size, len(classes))
    p = load_params(train.Params, model=preset, seed=seed)
    start = time.perf_counter()
    model = train.train_model(data, p, verbose=0, num_classes=len(classes))
    fit_s = time.perf_counter() - start
    n = len(data["x_train"])
    settings = train.settings_of(model, p, n)  # as the .keras file records them

    def accuracy(split):
        probs = model.predict(data[f"x_{split}"], batch_size=256, verbose=0)
        return compute_metrics(data[f"y_{split}"], probs)["accuracy"]

    chance = np.bincount(data["y_test"]).max() / len(data["y_test"])
    return (
        f"{name} ({side}x{side}x{channels}, {len(classes)} classes, {n} training images) "
        f"{preset}{', recoloured' if settings['recolour'] else ''}: {settings['epochs']} epochs of "
        f"{settings['passes_per_epoch']} passes, batch {settings['batch_size']}, rate "
        f"{settings['learning_rate']:g}; validation "
        f"{accuracy('val'):.1%}, test {accuracy('test'):.1%} of {len(data['y_test'])} "
        f"(chance {chance:.1%}), fit {fit_s:.0f} s"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["compact", "best"])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    print_machine(ceilings=False)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.datasets:
            for preset in args.presets:
                print(run(name, preset, args.seed, Path(tmp) / preset), flush=True)


if __name__ == "__main__":
    run_cli(main)
