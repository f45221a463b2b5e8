"""Time to accuracy: the training seconds at which test accuracy first reaches 98.5, 99.0,
99.3 and 99.5%, for the plain Keras tutorial and each preset of stages/models.py.

    python -m bench.time_to_accuracy                      # every default run below (hours)
    python -m bench.time_to_accuracy --run fast 1 42 1 2 --run tutorial 2 42
    python -m bench.time_to_accuracy --smoke --out /tmp/tta   # tiny sizes, for the tests

`--run NAME EPOCHS SEED [SEED ...]`: NAME is `tutorial` or a preset. A preset trains through
the train stage's own `train_model`, with params.yaml's train section plus the preset's
recipe (RECIPES, as in the README's preset table), on all 60,000 training images (the
prepare stage's arrays with validation_split 0). The tutorial trains as written: float32,
numpy arrays, validation_split=0.2 (48,000 images; its validation pass counts as training
time), Adadelta 1.0, batch 128. After each epoch a callback stops the clock and predicts the
10,000 test images; nothing in training sees them. Writes OUT/time_to_accuracy.json (after
every run, so a long benchmark keeps what it finished) and OUT/time_to_accuracy.png.
"""

import argparse
import time
from pathlib import Path

import keras
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from bench.common import TUTORIAL, load_data, machine, plain_tutorial, section_params
from stages import figures
from stages.common import write_json
from stages.evaluate import compute_metrics
from stages.train import train_model

THRESHOLDS = (0.985, 0.990, 0.993, 0.995)
RECIPES = {  # train params of each preset's README command; epochs come from --run
    "reference": {},
    "compact": {"learning_rate": 0.005},
    "best": {"learning_rate": 0.005},
    "fast": {"batch_size": 512, "learning_rate": 0.01},
}
DEFAULT_RUNS = [
    ["tutorial", "12", "42", "1", "2"],
    ["fast", "1", "42", "1", "2"],
    ["reference", "12", "42"],
    ["compact", "6", "42"],
    ["best", "20", "42"],
]
SMOKE = {"train_size": 600, "test_size": 500}


class TestClock(keras.callbacks.Callback):
    """At each epoch end: (training seconds so far, test accuracy); test time not counted.
    The clock starts before the model is built; `fit_s` is `fit` alone, from its first
    batch's set-up (tracing included) to its end."""

    def __init__(self, x_test, y_test):
        super().__init__()
        self.x_test, self.y_test = x_test, y_test
        self.start, self.paused, self.points = time.perf_counter(), 0.0, []

    def on_train_begin(self, logs=None):
        self.fit_start = time.perf_counter() - self.paused

    def on_train_end(self, logs=None):
        self.fit_s = round(time.perf_counter() - self.paused - self.fit_start, 3)

    def on_epoch_end(self, epoch, logs=None):
        stop = time.perf_counter()
        probs = self.model.predict(self.x_test, batch_size=1000, verbose=0)
        accuracy = compute_metrics(self.y_test, probs)["accuracy"]
        self.points.append([round(stop - self.start - self.paused, 3), accuracy])
        self.paused += time.perf_counter() - stop


def train_and_clock(name, epochs, seed, data):
    """Trains one run; returns its [[seconds, test accuracy], ...], one point per epoch, and
    the seconds of `fit` alone."""
    clock = TestClock(data["x_test"], data["y_test"])  # starts the clock
    if name == "tutorial":
        plain_tutorial(data["x_train"], data["y_train"], epochs, seed, [clock])
    else:
        p = section_params("train", model=name, epochs=epochs, seed=seed, **RECIPES[name])
        train_model(data, p, callbacks=[clock], verbose=0)
    return clock.points, clock.fit_s


def first_reach(points, threshold):
    """Seconds of the first point at or above threshold, None if never reached."""
    return next((s for s, acc in points if acc >= threshold), None)


def summarise(runs):
    """Per name: seeds, final accuracies, and per threshold the median seconds over the
    seeds that reached it and how many did."""
    summary = {}
    for name in dict.fromkeys(r["name"] for r in runs):
        mine = [r for r in runs if r["name"] == name]
        final = [r["points"][-1][1] for r in mine]
        reach = {}
        for t in THRESHOLDS:
            secs = [s for r in mine if (s := first_reach(r["points"], t)) is not None]
            reach[f"{t:.1%}"] = {
                "median_s": float(np.median(secs)) if secs else None,
                "reached": f"{len(secs)}/{len(mine)}",
            }
        summary[name] = {
            "seeds": [r["seed"] for r in mine],
            "epochs": mine[0]["epochs"],
            "final_mean": float(np.mean(final)),
            "final_min": float(np.min(final)),
            "seconds_to": reach,
        }
    return summary


def table(summary):
    header = f"{'':47} {'epochs':>6} {'seeds':>5} {'final (min)':>16}" + "".join(
        f"{f'>= {t:.1%}':>13}" for t in THRESHOLDS
    )
    lines = [header]
    for name, s in summary.items():
        cells = []
        for t in THRESHOLDS:
            r = s["seconds_to"][f"{t:.1%}"]
            n_reached, n = map(int, r["reached"].split("/"))
            cell = "-" if r["median_s"] is None else f"{r['median_s']:.1f} s"
            cells.append(cell + ("" if n_reached in (0, n) else f" ({r['reached']})"))
        label = TUTORIAL if name == "tutorial" else name
        final = f"{s['final_mean']:.2%} ({s['final_min']:.2%})"
        lines.append(
            f"{label:47} {s['epochs']:>6} {len(s['seeds']):>5} {final:>16}"
            + "".join(f"{c:>13}" for c in cells)
        )
    return "\n".join(lines)


def plot(runs, path, title):
    """Test accuracy against training seconds (log scale), one line per run."""
    names = list(dict.fromkeys(r["name"] for r in runs))
    colours = {name: plt.cm.tab10.colors[i % 10] for i, name in enumerate(names)}
    fig, ax = plt.subplots(figsize=(12, 5.5))
    labelled = set()
    for r in runs:
        seconds, accuracy = np.array(r["points"]).T
        tutorial = r["name"] == "tutorial"
        label = None if r["name"] in labelled else (TUTORIAL if tutorial else r["name"])
        labelled.add(r["name"])
        ax.plot(
            seconds,
            np.array(accuracy) * 100,
            marker="o",
            markersize=3,
            linewidth=2.5 if tutorial else 1.5,
            color="black" if tutorial else colours[r["name"]],
            label=label,
        )
    for t in THRESHOLDS:
        ax.axhline(t * 100, color="grey", linestyle=":", linewidth=0.8)
    # From just under the lowest final accuracy: the first epochs of the slower presets
    # (down to 92% for compact) would squeeze the 98-100% band the thresholds are in.
    floor = min(98.0, min(r["points"][-1][1] for r in runs) * 100) - 0.5
    ax.set(
        xscale="log",
        xlabel="training seconds (test evaluation excluded); "
        f"epochs below {floor:.1f}% are off the chart",
        ylabel="test accuracy (%)",
        ylim=(floor, 100.0),
        title=title,
    )
    ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 20, not 2x10^1
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: no point hidden
    ax.grid(True, which="both", alpha=0.3)
    figures.save(fig, path)


def parse_runs(specs):
    """[["fast", "1", "42", "1"], ...] -> [("fast", 1, [42, 1]), ...], checked."""
    runs = []
    for spec in specs:
        if len(spec) < 3 or spec[0] not in ("tutorial", *RECIPES):
            raise SystemExit(
                f"Error: --run {' '.join(spec)}: expected NAME EPOCHS SEED..., NAME one of "
                f"tutorial, {', '.join(RECIPES)}"
            )
        try:
            runs.append((spec[0], int(spec[1]), [int(s) for s in spec[2:]]))
        except ValueError:
            raise SystemExit(
                f"Error: --run {' '.join(spec)}: EPOCHS and SEEDs must be integers"
            ) from None
    return runs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--run", nargs="+", action="append", metavar="ARG", help="NAME EPOCHS SEED [SEED ...]"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny data: checks it runs")
    parser.add_argument("--out", default="bench/results", help="directory for JSON and PNG")
    args = parser.parse_args(argv)
    plan = parse_runs(args.run or DEFAULT_RUNS)
    sizes = SMOKE if args.smoke else {"train_size": None, "test_size": None}
    data = load_data(train_size=sizes["train_size"], validation_split=0.0)
    for key in ("x_test", "y_test"):
        data[key] = data[key][: sizes["test_size"]]
    out = Path(args.out)
    results = {
        "machine": machine(),
        "train_images": len(data["x_train"]),
        "test_images": len(data["x_test"]),
        "recipes": RECIPES,
        "runs": [],
    }
    for name, epochs, seeds in plan:
        for seed in seeds:
            points, fit_s = train_and_clock(name, epochs, seed, data)
            run = {"name": name, "epochs": epochs, "seed": seed, "points": points, "fit_s": fit_s}
            results["runs"].append(run)
            curve = ", ".join(f"{s:.1f} s {a:.2%}" for s, a in points)
            print(f"{name} seed {seed}: {curve} (fit alone {fit_s:.2f} s)", flush=True)
            results["summary"] = summarise(results["runs"])
            write_json(out / "time_to_accuracy.json", results)
    print(f"training seconds to test accuracy, median over seeds; {results['machine']}")
    print(table(results["summary"]))
    title = f"MNIST, time to test accuracy: {results['machine']}"
    plot(results["runs"], out / "time_to_accuracy.png", title)
    print(f"wrote {out / 'time_to_accuracy.json'} and {out / 'time_to_accuracy.png'}")


if __name__ == "__main__":
    main()
