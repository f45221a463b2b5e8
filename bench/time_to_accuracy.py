"""Time to accuracy: the training seconds at which test accuracy first reaches 98.5, 99.0,
99.3 and 99.5%, for the plain Keras tutorial and each preset of stages/models.py.

    python -m bench.time_to_accuracy [--run NAME EPOCHS SEED [SEED ...]] ... [--smoke] [--out DIR]

NAME: `tutorial` (bench/common.py) or a preset, with its own recipe; without --run,
DEFAULT_RUNS (hours). Each run trains through the train stage's `train_model`, a preset on
all 60,000 training images, the tutorial on the 48,000 its validation_split=0.2 leaves
(validation counted as training). A callback stops the clock at each epoch's end to score
the 10,000 test images, which training never sees. Writes OUT/time_to_accuracy.{json,png}.
"""

import argparse
import time
from pathlib import Path

import keras
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from bench.common import TUTORIAL, TUTORIAL_PARAMS, load_data, load_params, print_machine
from stages import figures, models, prepare, train
from stages.common import write_json
from stages.evaluate import compute_metrics

THRESHOLDS = (0.985, 0.990, 0.993, 0.995)
DEFAULT_RUNS = "tutorial 12 42 1 2, fast 1 42 1 2, reference 12 42, compact 6 42, best 20 42"
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


def train_and_clock(run, data):
    """Trains run {"name", "epochs", "seed"}; adds the train params it ran with, the images
    it trained on, [[seconds, test accuracy], ...] (one point per epoch) and `fit` alone."""
    if run["name"] == "tutorial":  # its script holds out the last fifth to validate
        (x, y), (x_val, y_val) = prepare.split_validation(data["x_train"], data["y_train"], 0.2)
        data = {**data, "x_train": x, "y_train": y, "x_val": x_val, "y_val": y_val}
    overrides = TUTORIAL_PARAMS if run["name"] == "tutorial" else {"model": run["name"]}
    p = load_params(train.Params, **overrides, epochs=run["epochs"], seed=run["seed"])
    clock = TestClock(data["x_test"], data["y_test"])  # starts the clock
    train.train_model(data, p, callbacks=[clock], verbose=0)
    n_train = len(data["x_train"])
    run.update(params=train.with_recipe(p, n_train).model_dump(), train_images=n_train)
    run.update(points=clock.points, fit_s=clock.fit_s)
    return run


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
        summary[name] = {
            "seeds": [r["seed"] for r in mine],
            "epochs": mine[0]["epochs"],
            "final_mean": float(np.mean(final)),
            "final_min": float(np.min(final)),
            "seconds_to": {},
        }
        for t in THRESHOLDS:
            secs = [s for r in mine if (s := first_reach(r["points"], t)) is not None]
            median = float(np.median(secs)) if secs else None
            reached = f"{len(secs)}/{len(mine)}"
            summary[name]["seconds_to"][f"{t:.1%}"] = {"median_s": median, "reached": reached}
    return summary


def table(summary):
    header = f"{'':47} {'epochs':>6} {'seeds':>5} {'final (min)':>16}"
    lines = [header + "".join(f"{f'>= {t:.1%}':>13}" for t in THRESHOLDS)]
    for name, s in summary.items():
        cells = []
        for r in s["seconds_to"].values():
            k, n = r["reached"].split("/")
            cell = "-" if r["median_s"] is None else f"{r['median_s']:.1f} s"
            cells.append(cell + ("" if k in ("0", n) else f" ({r['reached']})"))
        label = TUTORIAL if name == "tutorial" else name
        final = f"{s['final_mean']:.2%} ({s['final_min']:.2%})"
        row = f"{label:47} {s['epochs']:>6} {len(s['seeds']):>5} {final:>16}"
        lines.append(row + "".join(f"{c:>13}" for c in cells))
    return "\n".join(lines)


def plot(runs, path, machine):
    """Test accuracy against training seconds (log scale), one line per run."""
    fig, ax = plt.subplots(figsize=(12, 5.5))
    names = list(dict.fromkeys(r["name"] for r in runs))
    for r in runs:
        tutorial = r["name"] == "tutorial"
        first = r is next(q for q in runs if q["name"] == r["name"])  # one legend entry each
        label = (TUTORIAL if tutorial else r["name"]) if first else "_"
        colour = "black" if tutorial else plt.cm.tab10.colors[names.index(r["name"]) % 10]
        seconds, accuracy = np.array(r["points"]).T
        ax.plot(seconds, accuracy * 100, "o-", color=colour, ms=3, lw=1 + tutorial, label=label)
    for t in THRESHOLDS:
        ax.axhline(t * 100, color="grey", linestyle=":", linewidth=0.8)
    # From just under the lowest final accuracy: the first epochs of the slower presets
    # (down to 92% for compact) would squeeze the 98-100% band the thresholds are in.
    floor = min(98.0, min(r["points"][-1][1] for r in runs) * 100) - 0.5
    ax.set(xscale="log", ylim=(floor, 100.0), ylabel="test accuracy (%)")
    ax.set_title(f"MNIST, time to test accuracy\n{machine}")
    ax.set_xlabel(f"training seconds (test evaluation excluded); below {floor:.1f}%: off the chart")
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
        try:
            name, epochs, *seeds = spec
            if name not in ("tutorial", *models.BUILDERS) or not seeds:
                raise ValueError
            runs.append((name, int(epochs), [int(s) for s in seeds]))
        except ValueError:
            raise SystemExit(
                f"Error: --run {' '.join(spec)}: expected NAME EPOCHS SEED..., NAME one of "
                f"tutorial, {', '.join(models.BUILDERS)}, EPOCHS and SEEDs integers"
            ) from None
    return runs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--run", nargs="+", action="append", metavar="ARG", help="NAME EPOCHS SEED [SEED ...]"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny data: checks it runs")
    parser.add_argument("--out", default="bench/results", help="directory for JSON and PNG")
    args = parser.parse_args(argv)
    plan = parse_runs(args.run or [run.split() for run in DEFAULT_RUNS.split(", ")])
    sizes = SMOKE if args.smoke else {"train_size": "all", "test_size": "all"}
    line = print_machine(ceilings=not args.smoke)  # a smoke run's times are no figures
    data = load_data(**sizes, validation_split=0.0)
    out = Path(args.out)
    results = {"machine": line, "test_images": len(data["x_test"]), "runs": []}
    for name, epochs, seed in [(n, e, s) for n, e, seeds in plan for s in seeds]:
        run = train_and_clock({"name": name, "epochs": epochs, "seed": seed}, data)
        results["runs"].append(run)
        curve = ", ".join(f"{s:.1f} s {a:.2%}" for s, a in run["points"])
        print(f"{name} seed {seed}: {curve} (fit alone {run['fit_s']:.2f} s)", flush=True)
        results["summary"] = summarise(results["runs"])
        write_json(out / "time_to_accuracy.json", results)
    print("training seconds to test accuracy, median over seeds")
    print(table(results["summary"]))
    plot(results["runs"], out / "time_to_accuracy.png", results["machine"])
    print(f"wrote {out / 'time_to_accuracy.json'} and {out / 'time_to_accuracy.png'}")


if __name__ == "__main__":
    main()
