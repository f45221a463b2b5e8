"""The benchmark's smoke modes, so that they cannot rot; its full modes are run by hand."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import HAVE_MNIST, MNIST_MIRROR, ROOT

pytestmark = pytest.mark.skipif(not HAVE_MNIST, reason="offline MNIST mirror not present")


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


def test_benchmark_smoke_mode_prints_the_table_and_writes_json(tmp_path):
    out = tmp_path / "speed.json"
    result = run_bench("train_speed", "--smoke", "--out", out)
    assert "ratio pipeline / plain" in result.stdout
    results = json.loads(out.read_text())
    assert results["ratio"] == pytest.approx(results["pipeline"] / results["plain_keras"])
    assert set(results["batch_sizes"]) == {"32", "64"}
    rss = results["peak_rss_mib"]
    assert set(rss) == {"fetch", "prepare", "train", "evaluate"}
    assert rss["fetch"] < rss["train"]  # each stage's own peak, not the benchmark's
    assert all(v > 0 for v in results["ceiling_gflops"].values())


def test_accuracy_mode_trains_both_sides_per_seed_and_summarises(tmp_path):
    out = tmp_path / "accuracy.json"
    result = run_bench(
        "train_speed", "--accuracy", 7, "--epochs", 1, "--train-size", 320, "--out", out
    )
    results = json.loads(out.read_text())
    assert results["train_images"] == 256  # 320 minus the validation fifth
    assert [(r["side"], r["seed"]) for r in results["runs"]] == [
        ("plain_keras", 7),
        ("pipeline", 7),
    ]
    for run in results["runs"]:
        assert 0.0 <= run["test_accuracy"] <= 1.0
        assert results[run["side"]] == {"mean": run["test_accuracy"], "std": 0.0}
    assert f"pipeline: mean {results['pipeline']['mean']:.4%}" in result.stdout


def test_where_time_goes_smoke_mode_runs_variants_in_fresh_processes(tmp_path):
    out = tmp_path / "where.json"
    result = run_bench(
        "where_time_goes", "--smoke", "--only", "plain", "bf16_noval", "f32_1thread", "--out", out
    )
    ips = json.loads(out.read_text())["images_per_s"]
    assert list(ips) == ["plain", "bf16_noval", "f32_1thread"]
    assert all(v > 0 for v in ips.values())
    assert "... with 1 intra-op and 1 inter-op thread" in result.stdout
