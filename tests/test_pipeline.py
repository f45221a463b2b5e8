"""The real pipeline, run as a user runs it: `dvc repro`, `dvc status`, diffs between
branches, the report and experiments, in a temporary git repository holding a copy of the
project, on a tiny subset of the real MNIST files (the offline mirror)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import HAVE_MNIST, MNIST_MIRROR, ROOT, write_params

pytestmark = pytest.mark.skipif(not HAVE_MNIST, reason="offline MNIST mirror not present")

PROJECT_FILES = [
    "stages",
    "tools",
    "dvc.yaml",
    "params.yaml",
    ".gitignore",
    ".dvcignore",
    ".ci/train-report",
]
TINY = {
    "prepare__train_size": 500,
    "train__epochs": 1,
    "train__batch_size": 64,
    "evaluate__gallery_size": 8,
}


def sh(repo, *cmd, check=True):
    env = {
        **os.environ,
        "MNIST_MIRROR": str(MNIST_MIRROR),
        # DVC runs `python -m stages.X`: the interpreter running the tests must be first.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    result = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout + result.stderr


def set_param(repo, **overrides):
    write_params(repo / "params.yaml", source=repo / "params.yaml", **overrides)


def ran_stages(output):
    return [
        s for s in ("fetch", "prepare", "train", "evaluate") if f"Running stage '{s}'" in output
    ]


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("project")
    for name in PROJECT_FILES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, repo / name)
    write_params(repo / "params.yaml", **TINY)
    sh(repo, "git", "init", "-q", "-b", "main")
    sh(repo, "git", "config", "user.email", "test@example.com")
    sh(repo, "git", "config", "user.name", "Test")
    sh(repo, "dvc", "init", "-q")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "project")
    return repo


def test_repro_runs_every_stage_once_then_nothing(repo):
    first = sh(repo, "dvc", "repro")
    assert ran_stages(first) == ["fetch", "prepare", "train", "evaluate"]
    assert "prepare: wrote data/prepared (train 400, val 100, test 10000)" in first
    again = sh(repo, "dvc", "repro")
    assert ran_stages(again) == []
    assert "Data and pipelines are up to date." in again
    assert "Data and pipelines are up to date." in sh(repo, "dvc", "status")
    metrics = json.loads((repo / "data/evaluate/metrics.json").read_text())
    assert sum(c["support"] for c in metrics["per_class"].values()) == 10_000
    # Outputs DVC caches are ignored by git; the metrics and plots are committed.
    status = sh(repo, "git", "status", "--porcelain")
    assert "data/raw" not in status and "data/prepared" not in status
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "baseline")
    tracked = sh(repo, "git", "ls-files", "data").split()
    assert "data/evaluate/metrics.json" in tracked and "data/train/metrics.json" in tracked
    assert not [
        f for f in tracked if f.startswith(("data/raw/", "data/prepared/", "data/model/model"))
    ]


def test_changing_epochs_reruns_only_train_and_evaluate(repo):
    sh(repo, "git", "checkout", "-q", "-b", "more-epochs")
    set_param(repo, train__epochs=2)
    status = sh(repo, "dvc", "status")
    assert "train:" in status and "modified:           train.epochs" in status.replace("\t", " ")
    output = sh(repo, "dvc", "repro")
    assert ran_stages(output) == ["train", "evaluate"]
    assert "Stage 'prepare' didn't change, skipping" in output
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "two epochs")


def test_changing_validation_split_reruns_prepare_train_evaluate(repo):
    set_param(repo, prepare__validation_split=0.3)
    assert "prepare:" in sh(repo, "dvc", "status")
    output = sh(repo, "dvc", "repro")
    assert ran_stages(output) == ["prepare", "train", "evaluate"]
    assert "prepare: wrote data/prepared (train 350, val 150, test 10000)" in output
    # Back to the committed state: git restores params and metrics, DVC the cached data.
    sh(repo, "git", "checkout", "--", ".")
    sh(repo, "dvc", "checkout")
    assert "Data and pipelines are up to date." in sh(repo, "dvc", "status")


def test_metrics_and_params_diff_between_branches(repo):
    params = json.loads(sh(repo, "dvc", "params", "diff", "main", "--json"))
    assert params == {"params.yaml": {"train.epochs": {"old": 1, "new": 2, "diff": 1}}}
    old = json.loads(sh(repo, "git", "show", "main:data/evaluate/metrics.json"))
    new = json.loads((repo / "data/evaluate/metrics.json").read_text())
    metrics = json.loads(sh(repo, "dvc", "metrics", "diff", "main", "--all", "--json"))
    accuracy = metrics["data/evaluate/metrics.json"]["accuracy"]
    assert (accuracy["old"], accuracy["new"]) == (old["accuracy"], new["accuracy"])
    assert "data/evaluate/metrics.json" in sh(repo, "dvc", "metrics", "diff", "main", "--all")


def test_plots_diff_draws_both_revisions(repo):
    plots = json.loads(sh(repo, "dvc", "plots", "diff", "main", "--json", "--split"))["data"]
    assert {"Loss", "Accuracy", "data/evaluate/confusion.csv"} <= set(plots)
    assert set(plots["Loss"][0]["revisions"]) == {"main", "workspace"}
    images = sorted(k for k in plots if k.endswith(".png"))
    assert [k.rsplit("/", 1)[1] for k in images] == ["confusion.png", "curves.png", "errors.png"]
    for key in images:
        assert {r for image in plots[key] for r in image["revisions"]} == {"main", "workspace"}


def test_report_gives_the_exact_accuracy_delta_and_the_changed_param(repo):
    output = sh(repo, sys.executable, "-m", "tools.report", "--base", "main")
    text = (repo / "report.md").read_text()
    old = json.loads(sh(repo, "git", "show", "main:data/evaluate/metrics.json"))["accuracy"]
    new = json.loads((repo / "data/evaluate/metrics.json").read_text())["accuracy"]
    delta = f"{new - old:+.4f}"
    assert f"| accuracy | {old:.4f} | {new:.4f} | {delta} |" in text
    assert "| `train.epochs` | 1 | 2 |" in text
    assert "report: **Test accuracy" in output
    for png in ("curves.png", "confusion.png", "errors.png"):
        assert f"(data/evaluate/plots/{png})" in text
        assert (repo / "data/evaluate/plots" / png).read_bytes()[:4] == b"\x89PNG"


def test_report_against_a_base_without_metrics_fails_clearly(repo):
    result = subprocess.run(
        [sys.executable, "-m", "tools.report", "--base", "HEAD~2"],
        cwd=repo,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "Error: base revision 'HEAD~2' has no data/evaluate/metrics.json; "
        "reproduce and commit it there first"
    )


def test_experiments_run_queue_and_show(repo):
    sh(repo, "dvc", "exp", "run", "-n", "lr-half", "-S", "train.learning_rate=0.5")
    sh(repo, "dvc", "exp", "run", "--queue", "-n", "seed-7", "-S", "train.seed=7")
    sh(repo, "dvc", "exp", "run", "--run-all")
    shown = json.loads(sh(repo, "dvc", "exp", "show", "--json"))
    experiments = {}
    for rev in shown:
        for exp in rev.get("experiments") or []:
            run = exp["revs"][0]
            data = run["data"]
            experiments[run["name"]] = (
                data["params"]["params.yaml"]["data"]["train"],
                data["metrics"]["data/evaluate/metrics.json"]["data"]["accuracy"],
            )
    assert experiments["lr-half"][0]["learning_rate"] == 0.5
    assert experiments["seed-7"][0]["seed"] == 7
    assert all(0.0 <= accuracy <= 1.0 for _, accuracy in experiments.values())


def test_ci_script_reproduces_with_overrides_and_writes_the_report(repo):
    sh(repo, "git", "checkout", "-q", "--", ".")
    output = sh(repo, "bash", ".ci/train-report", "main", "train.learning_rate=0.8")
    assert ran_stages(output) == ["train", "evaluate"]
    text = (repo / "report.md").read_text()
    assert "| `train.learning_rate` | 1.0 | 0.8 |" in text
    assert "| `train.epochs` | 1 | 2 |" in text
    assert "**Test accuracy" in text
