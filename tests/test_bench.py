"""The benchmark's smoke mode, so that it cannot rot; its full mode is run by hand."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import HAVE_MNIST, MNIST_MIRROR, ROOT


@pytest.mark.skipif(not HAVE_MNIST, reason="offline MNIST mirror not present")
def test_benchmark_smoke_mode_prints_the_table_and_writes_json(tmp_path):
    out = tmp_path / "speed.json"
    env = {
        **os.environ,
        "MNIST_MIRROR": str(MNIST_MIRROR),
        "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}",
    }
    result = subprocess.run(
        [sys.executable, "-m", "bench.train_speed", "--smoke", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ratio pipeline / plain" in result.stdout
    results = json.loads(out.read_text())
    assert results["ratio"] == pytest.approx(results["pipeline"] / results["plain_keras"])
    assert set(results["batch_sizes"]) == {"32", "64"}
    rss = results["peak_rss_mib"]
    assert set(rss) == {"fetch", "prepare", "train", "evaluate"}
    assert rss["fetch"] < rss["train"]  # each stage's own peak, not the benchmark's
    assert all(v > 0 for v in results["ceiling_gflops"].values())
