"""The benchmark's smoke modes, so that they cannot rot; its full modes are run by hand."""

import json
import os
import subprocess
import sys

import pytest

from bench import time_to_accuracy as tta
from tests.conftest import HAVE_MNIST, MNIST_MIRROR, ROOT

needs_mnist = pytest.mark.skipif(not HAVE_MNIST, reason="offline MNIST mirror not present")


def run_bench(module, *args):
    env = {
        **os.environ,
        "MNIST_MIRROR": str(MNIST_MIRROR),
        "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}",
    }
    result = subprocess.run(
        [sys.executable, "-m", f"bench.{module}", *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
@needs_mnist
def test_train_speed_smoke_prints_the_table_and_measures_stages_in_a_scratch_dvc_project(
    tmp_path,
):
    out = tmp_path / "speed.json"
    before = subprocess.run(
        ["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, check=True
    )
    result = run_bench("train_speed", "--smoke", "--out", out)
    assert "ratio pipeline / plain" in result.stdout
    results = json.loads(out.read_text())
    assert results["ratio"] == pytest.approx(results["pipeline"] / results["plain_keras"])
    assert set(results["batch_sizes"]) == {"32", "64"}
    # counted by TensorFlow's profiler: 3 x (2 x 45.2 M multiply-adds + bias and ReLU)
    assert results["train_mflop_per_image"] == pytest.approx(271.9, abs=0.1)
    rss = results["peak_rss_mib"]
    assert set(rss) == {"fetch", "prepare", "train", "evaluate", "export"}  # all of dvc.yaml
    assert rss["fetch"] < rss["train"]  # each stage's own peak, not dvc's
    assert all(v > 0 for v in results["ceiling_gflops"].values())
    assert results["dvc_repro_noop_s"] > 0
    after = subprocess.run(
        ["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, check=True
    )
    assert after.stdout == before.stdout  # dvc ran in the scratch copy, not in this checkout


@pytest.mark.slow
@needs_mnist
def test_variants_smoke_runs_each_variant_in_a_fresh_process(tmp_path):
    out = tmp_path / "variants.json"
    result = run_bench(
        "train_speed", "--smoke", "--variants", "plain", "bf16_noval", "f32_1thread", "--out", out
    )
    ips = json.loads(out.read_text())["images_per_s"]
    assert sorted(ips) == ["bf16_noval", "f32_1thread", "plain"]
    assert all(v > 0 for v in ips.values())
    lines = result.stdout.splitlines()
    rows = [next(i for i, line in enumerate(lines) if text in line) for text in (
        "plain Keras tutorial (R-interface example CNN): float32, numpy",
        "... without the validation pass",
        "... with 1 intra-op and 1 inter-op thread",
    )]  # fmt: skip
    assert rows == sorted(rows)  # in the order asked for


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
    assert "4.5 s (2/3)" in tta.table(tta.summarise(runs))


def test_a_run_of_an_unknown_preset_is_refused_with_the_names_allowed():
    with pytest.raises(SystemExit) as e:
        tta.parse_runs([["tiny", "1", "42"]])
    assert str(e.value) == (
        "Error: --run tiny 1 42: expected NAME EPOCHS SEED..., "
        "NAME one of tutorial, reference, compact, best, fast"
    )


@pytest.mark.slow
@needs_mnist
def test_time_to_accuracy_smoke_clocks_each_seed_every_epoch_and_draws_one_chart(tmp_path):
    result = run_bench(
        "time_to_accuracy",
        "--smoke",
        "--run", "tutorial", 2, 7,
        "--run", "fast", 2, 7, 8,
        "--out", tmp_path,
    )  # fmt: skip
    results = json.loads((tmp_path / "time_to_accuracy.json").read_text())
    assert (results["train_images"], results["test_images"]) == (600, 500)
    assert [(r["name"], r["seed"]) for r in results["runs"]] == [
        ("tutorial", 7),
        ("fast", 7),
        ("fast", 8),
    ]
    for run in results["runs"]:
        (s1, _), (s2, _) = run["points"]  # one point per epoch
        assert 0 < s1 < s2
        assert 0 < run["fit_s"] < s2  # fit alone: without building and compiling the model
    assert results["summary"]["fast"]["seeds"] == [7, 8]
    assert (tmp_path / "time_to_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "plain Keras tutorial (R-interface example CNN)" in result.stdout


@pytest.mark.slow
@needs_mnist
def test_export_speed_times_each_exported_format(reproduced, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "bench.export_speed", "--images", "3", "--out", str(tmp_path)],
        cwd=reproduced[0],  # reads dvc.yaml's paths there: the tiny pipeline's outputs
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads((tmp_path / "export_speed.json").read_text())
    assert [name.split()[0] for name in figures] == ["keras", "onnx", "saved_model"]
    for timing in figures.values():
        assert set(timing) == {"batch_1", "batch_1000"} and min(timing.values()) > 0
    assert "ms per image: batch 1 (median of 3) / batch 1000" in result.stdout
