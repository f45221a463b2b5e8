"""The benchmarks: their pure parts on made-up numbers, and each script end to end in smoke
mode on tiny data (its full mode is run by hand)."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from bench import export_speed, train_speed
from bench import time_to_accuracy as tta
from stages import models
from stages.common import run_cli
from tests.conftest import HAVE_MNIST, MNIST_MIRROR, ROOT

needs_mnist = pytest.mark.skipif(not HAVE_MNIST, reason="offline MNIST mirror not present")


def run_bench(module, *args, cwd=ROOT):
    env = {
        **os.environ,
        "MNIST_MIRROR": str(MNIST_MIRROR),
        "PYTHONPATH": str(ROOT),
        "PYTHONDONTWRITEBYTECODE": "1",  # cwd may be a shared fixture: leave it as it is
    }
    result = subprocess.run(
        [sys.executable, "-m", f"bench.{module}", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


# --- train_speed -------------------------------------------------------------------------


def fake_child(calls, speeds):
    """Stands in for in_fresh_process: records (variant, batch sizes) and returns the next
    of that variant's made-up images/s for each batch size."""

    def measure(name, train_size, batch_sizes):
        calls.append((name, train_size, batch_sizes))
        ips = speeds[name].pop(0)
        return {
            "images_per_s": {str(b): ips * b / 128 for b in batch_sizes},
            "precision": "float32" if name == "plain" else "mixed_bfloat16",
            "flop_per_image": 1e8,
        }

    return measure


def test_rounds_rotate_the_order_and_report_each_variants_median(monkeypatch):
    calls = []
    speeds = {"plain": [100.0, 300.0, 200.0], "pipeline": [500.0, 400.0, 100.0]}
    monkeypatch.setattr(train_speed, "in_fresh_process", fake_child(calls, speeds))
    cfg = {"train_size": 320, "rounds": 3, "batch_sizes": [64]}
    results = train_speed.run_rounds(["plain", "pipeline"], cfg)
    assert calls == [
        ("plain", 320, [128]),
        ("pipeline", 320, [128, 64]),
        ("pipeline", 320, [128, 64]),  # round 2 starts with the other one
        ("plain", 320, [128]),
        ("plain", 320, [128]),
        ("pipeline", 320, [128, 64]),
    ]
    assert results["images_per_s"] == {
        "plain": {"128": 200.0},
        "pipeline": {"128": 400.0, "64": 200.0},  # medians of 500, 400, 100 and their halves
    }
    rows = [line.split()[-5:] for line in train_speed.report(results).splitlines()[1:]]
    # images/s, GFLOP/s at 1e8 FLOP per image, ratio to the tutorial at batch 128
    assert rows == [
        ["200", "20.0", "GFLOP/s", "1.00x", "float32"],
        ["400", "40.0", "GFLOP/s", "2.00x", "mixed_bfloat16"],
        ["200", "20.0", "GFLOP/s", "1.00x", "mixed_bfloat16"],
    ]


def test_make_bench_times_the_pipeline_against_the_tutorial_and_writes_the_json(
    monkeypatch, tmp_path, capsys
):
    calls = []
    speeds = {"plain": [250.0], "pipeline": [500.0]}
    monkeypatch.setattr(train_speed, "in_fresh_process", fake_child(calls, speeds))
    train_speed.main(["--smoke", "--out", str(tmp_path / "speed.json")])
    assert calls == [("plain", 320, [128]), ("pipeline", 320, [128, 64])]
    saved = json.loads((tmp_path / "speed.json").read_text())
    assert saved["images_per_s"] == {
        "plain": {"128": 250.0},
        "pipeline": {"128": 500.0, "64": 250.0},
    }
    assert "pipeline train code, params.yaml, batch 64" in capsys.readouterr().out


def test_variants_without_the_tutorial_are_refused(capsys):
    with pytest.raises(SystemExit) as e:
        train_speed.main(["--variants", "xla"])
    assert e.value.code == 2
    assert (
        capsys.readouterr()
        .err.splitlines()[-1]
        .endswith("error: --variants must include plain, the baseline of the ratios")
    )


@pytest.mark.slow
@needs_mnist
def test_each_variant_trains_with_its_own_settings_in_its_own_process(tmp_path):
    out = tmp_path / "variants.json"
    result = run_bench(
        "train_speed", "--smoke", "--variants", "plain", "no_validation", "spe_8", "--out", out
    )
    first = {name: runs[0] for name, runs in json.loads(out.read_text())["runs"].items()}
    # smoke: prepare.train_size 320; params.yaml holds out the last 20% to validate
    assert (first["plain"]["precision"], first["plain"]["train_images"]) == ("float32", 256)
    assert first["plain"]["val_images"] == 64
    assert (first["no_validation"]["train_images"], first["no_validation"]["val_images"]) == (
        320,
        0,
    )
    # The reference CNN's multiply-adds, counted by hand: conv 3x3x1 -> 64 on 26x26, conv
    # 3x3x64 -> 128 on 24x24, dense 9216 -> 128, dense 128 -> 10; 2 FLOPs each, 3 passes
    # (forward, and twice that backward); biases, ReLUs and pooling add under 5%.
    macs = 26 * 26 * 64 * 9 + 24 * 24 * 128 * 9 * 64 + 9216 * 128 + 128 * 10
    assert first["plain"]["flop_per_image"] == pytest.approx(3 * 2 * macs, rel=0.05)
    rows = [line.strip() for line in result.stdout.splitlines() if line.startswith("  ")]
    assert len(rows) == 3  # one row each, in the order asked for
    assert rows[0].startswith("plain Keras tutorial (R-interface example CNN): float32 ")
    assert rows[1].startswith("... without the validation pass ")
    assert rows[2].startswith("... steps_per_execution 8 ")


# --- time_to_accuracy --------------------------------------------------------------------


class FakeModel:
    """Predicts digits 0, 1, 2, 0 for the first epoch, then 0, 1, 2, 3."""

    def __init__(self):
        self.predictions = [[0, 1, 2, 0], [0, 1, 2, 3]]

    def predict(self, x, batch_size, verbose):
        return np.eye(10, dtype=np.float32)[self.predictions.pop(0)]


def test_the_clock_leaves_out_the_test_predictions_and_the_model_building(monkeypatch):
    # created, fit starts, epoch 1 ends, its test predictions end, epoch 2 ..., fit ends
    ticks = iter([100.0, 101.0, 103.0, 110.0, 115.0, 118.0, 120.0])
    monkeypatch.setattr(tta.time, "perf_counter", lambda: next(ticks))
    clock = tta.TestClock(np.zeros((4, 28, 28, 1), np.float32), np.array([0, 1, 2, 3]))
    clock.set_model(FakeModel())
    clock.on_train_begin()
    clock.on_epoch_end(0)
    clock.on_epoch_end(1)
    clock.on_train_end()
    # 103 - 100; 115 - 100 - 7 s of predictions; fit: 120 - 101 - 7 - 3
    assert clock.points == [[3.0, 0.75], [8.0, 1.0]]
    assert clock.fit_s == 9.0


def test_first_reach_is_the_first_epoch_at_or_above_the_threshold():
    points = [[10.0, 0.98], [20.0, 0.99], [30.0, 0.9895], [40.0, 0.995]]
    assert tta.first_reach(points, 0.99) == 20.0
    assert tta.first_reach(points, 0.995) == 40.0
    assert tta.first_reach(points, 0.996) is None


def test_summary_takes_the_median_over_the_seeds_that_reached_and_counts_them():
    runs = [
        {"name": "fast", "epochs": 1, "seed": 42, "points": [[4.0, 0.991]]},
        {"name": "fast", "epochs": 1, "seed": 1, "points": [[6.0, 0.986]]},
        {"name": "fast", "epochs": 1, "seed": 2, "points": [[5.0, 0.990]]},
    ]
    s = tta.summarise(runs)["fast"]
    assert s["seeds"] == [42, 1, 2]
    assert s["final_min"] == 0.986
    assert s["final_mean"] == pytest.approx(0.989)
    assert s["seconds_to"]["98.5%"] == {"median_s": 5.0, "reached": "3/3"}
    assert s["seconds_to"]["99.0%"] == {"median_s": 4.5, "reached": "2/3"}
    assert s["seconds_to"]["99.3%"] == {"median_s": None, "reached": "0/3"}
    row = tta.table(tta.summarise(runs)).splitlines()[1]
    assert row.split() == [
        "fast",
        "1",
        "3",
        "98.90%",
        "(98.60%)",
        "5.0",
        "s",
        "4.5",
        "s",
        "(2/3)",
        "-",
        "-",
    ]


@pytest.mark.parametrize("spec", [["tiny", "1", "42"], ["fast", "1"], ["fast", "one", "42"]])
def test_a_run_that_is_not_a_name_epochs_and_seeds_is_refused(spec):
    with pytest.raises(SystemExit) as e:
        tta.parse_runs([spec])
    assert str(e.value) == (
        f"Error: --run {' '.join(spec)}: expected NAME EPOCHS SEED..., NAME one of tutorial, "
        "reference, compact, best, fast, EPOCHS and SEEDs integers"
    )


def test_the_runs_of_docs_benchmarks_md_parse():
    specs = ["fast 1 42 1 2", "reference 12 42", "compact 6 42", "best 20 42", "tutorial 6 42 1 2"]
    assert tta.parse_runs([spec.split() for spec in specs]) == [
        ("fast", 1, [42, 1, 2]),
        ("reference", 12, [42]),
        ("compact", 6, [42]),
        ("best", 20, [42]),
        ("tutorial", 6, [42, 1, 2]),
    ]


@pytest.mark.slow
@needs_mnist
def test_time_to_accuracy_trains_each_run_with_its_recipe_and_clocks_every_epoch(tmp_path):
    result = run_bench(
        "time_to_accuracy",
        "--smoke",
        "--run", "tutorial", 2, 7,
        "--run", "fast", 2, 7, 8,
        "--out", tmp_path,
    )  # fmt: skip
    results = json.loads((tmp_path / "time_to_accuracy.json").read_text())
    runs = results["runs"]
    assert [(r["name"], r["seed"], len(r["points"])) for r in runs] == [
        ("tutorial", 7, 2),
        ("fast", 7, 2),
        ("fast", 8, 2),
    ]
    tutorial, fast = runs[0], runs[1]
    # The tutorial's script: the reference CNN in float32, Adadelta 1.0, batch 128, on the
    # 480 of smoke's 600 images that its validation_split=0.2 leaves
    assert {k: tutorial["params"][k] for k in ("model", "mixed_precision", "batch_size")} == {
        "model": "reference",
        "mixed_precision": "float32",
        "batch_size": 128,
    }
    assert (tutorial["params"]["learning_rate"], tutorial["train_images"]) == (1.0, 480)
    # fast with its own recipe (batch 512, peak rate 0.01) on all 600
    assert (fast["params"]["batch_size"], fast["params"]["learning_rate"]) == (512, 0.01)
    assert fast["train_images"] == 600 and results["test_images"] == 500
    # Trained on real digits and scored on real test digits: well above chance (10%)
    assert tutorial["points"][-1][1] > 0.3
    assert min(r["points"][-1][1] for r in runs[1:]) > 0.2
    assert (tmp_path / "time_to_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = result.stdout.split("median over seeds")[1].splitlines()[2:4]  # after the header
    assert [row.split("  ")[0] for row in table] == [
        "plain Keras tutorial (R-interface example CNN)",
        "fast",
    ]
    assert table[1].split()[1:3] == ["2", "2"]  # epochs, seeds


# --- export_speed ------------------------------------------------------------------------


def test_export_speed_without_an_export_says_how_to_make_one(monkeypatch, tmp_path, capsys):
    shutil.copy2(ROOT / "dvc.yaml", tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        run_cli(export_speed.main, [])
    assert e.value.code == 1
    assert capsys.readouterr().err == (
        "Error: data/export/model.onnx not found; run `dvc repro export`\n"
    )


@pytest.mark.slow
@needs_mnist
def test_export_speed_times_each_format_the_pipeline_exported(reproduced, tmp_path):
    project = reproduced[0]  # read only: its outputs, where its dvc.yaml puts them
    result = run_bench("export_speed", "--images", 3, "--out", tmp_path, cwd=project)
    figures = json.loads((tmp_path / "export_speed.json").read_text())
    # The .keras model in the precision the train stage recorded in it
    trained_in = models.recorded(project / "data/model/model.keras", "training")["precision"]
    assert list(figures) == [f"keras ({trained_in})", "onnx", "saved_model"]
    assert all(set(timing) == {"batch_1", "batch_1000"} for timing in figures.values())
    assert "ms per image: batch 1 (median of 3) / batch 1000" in result.stdout
