"""`fast` over seeds: test accuracy and `fit` time per seed, in each precision asked for.

    python -m bench.fast_seeds [--precisions float32 mixed_bfloat16] [--seeds 1 2 3 4 5]
                               [--set KEY=VALUE ...] [--against KEY=VALUE ...]
                               [--train-size N]

Each run is the train stage's `train_model` on all 60,000 training images (as
`-S prepare.validation_split=0`) with params.yaml's train section, `train.model: fast`,
the seed and `train.mixed_precision` set, plus any --set (train keys: batch_size=384);
the 10,000 test images score it. Prints one line per run and, per precision, the minimum
and median: the table docs/benchmarks.md gives for `fast`. With --against, each seed also
runs with those settings right after (interleaved, as the host's speed drifts), and the
median ratio of the two `fit` times is printed.
"""

import argparse
import statistics
import time

import yaml

from bench.common import load_data, load_params, print_machine
from stages import train
from stages.common import run_cli
from stages.evaluate import compute_metrics


def run(data, precision, seed, overrides):
    """(test accuracy, fit seconds) of one `fast` run."""
    p = load_params(train.Params, model="fast", seed=seed, mixed_precision=precision, **overrides)
    start = time.perf_counter()
    model = train.train_model(data, p, verbose=0)
    fit_s = time.perf_counter() - start
    probs = model.predict(data["x_test"], batch_size=1000, verbose=0)
    return compute_metrics(data["y_test"], probs)["accuracy"], fit_s


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precisions", nargs="+", default=["float32", "mixed_bfloat16"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3, 4, 5])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--against", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--train-size", default="all", help="the first N training images")
    args = parser.parse_args(argv)
    overrides, against = (
        {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in settings)}
        for settings in (args.set, args.against)
    )
    print_machine(ceilings=False)
    size = args.train_size if args.train_size == "all" else int(args.train_size)
    data = load_data(validation_split=0.0, train_size=size)
    for precision in args.precisions:
        accuracies, ratios = [], []
        for seed in args.seeds:
            accuracy, fit_s = run(data, precision, seed, overrides)
            accuracies.append(accuracy)
            print(f"{precision} seed {seed}: test accuracy {accuracy:.2%}, fit {fit_s:.2f} s")
            if against:
                other, other_s = run(data, precision, seed, {**overrides, **against})
                ratios.append(fit_s / other_s)
                print(f"  with {' '.join(args.against)}: {other:.2%}, fit {other_s:.2f} s")
        print(
            f"{precision}: min {min(accuracies):.2%}, median "
            f"{statistics.median(accuracies):.2%} over seeds {args.seeds}",
            flush=True,
        )
        if ratios:
            print(
                f"{precision}: fit / fit with {' '.join(args.against)}: median "
                f"{statistics.median(ratios):.2f} ({', '.join(f'{r:.2f}' for r in ratios)})"
            )


if __name__ == "__main__":
    run_cli(main)
