"""The real pipeline, run as a user runs it: `dvc repro`, `dvc status`, diffs between
branches, the report and experiments, in a temporary git repository holding a copy of the
project, on a tiny subset of the real MNIST files (the offline mirror).

Each test gets its own copy of a reproduced project (`repo`), or reads a shared one that
no test changes (`branches`), so that any test runs alone and in any order."""

import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest

from tests.conftest import (
    HAVE_MNIST,
    build_once,
    commit,
    copy_reproduced,
    edit_params,
    ran_stages,
    run,
    sh,
    shown_experiments,
    user_env,
)

pytestmark = [
    pytest.mark.skipif(not HAVE_MNIST, reason="offline MNIST mirror not present"),
    pytest.mark.slow,
]


@pytest.fixture
def repo(reproduced, tmp_path):
    """This test's own copy of the reproduced project (git history and DVC cache too)."""
    return copy_reproduced(reproduced, tmp_path / "project")


def build_branches(reproduced, repo):
    copy_reproduced(reproduced, repo)
    sh(repo, "git", "checkout", "-q", "-b", "more-epochs")
    edit_params(repo / "params.yaml", train__epochs=2)
    status = sh(repo, "dvc", "status")
    output = sh(repo, "dvc", "repro")
    commit(repo, "two epochs")
    return {"status": status, "output": output}


@pytest.fixture(scope="session")
def branches(reproduced, tmp_path_factory, worker_id):
    """A copy with branch `more-epochs` (train.epochs 1 -> 2) reproduced and committed
    on top of `main`: .repo, and the .status and .output of `dvc status` and `dvc repro`
    after the edit. Reproduced once per test run; each pytest worker reads its own copy
    (with `dvc` commands: no two processes run DVC in one repository at once)."""
    built, record = build_once(
        tmp_path_factory, worker_id, "branches", lambda d: build_branches(reproduced, d)
    )
    copy = tmp_path_factory.mktemp("branches") / "project"
    shutil.copytree(built, copy, symlinks=True)
    return SimpleNamespace(repo=copy, **record)


def test_repro_runs_every_stage_once_then_nothing(reproduced, repo):
    first = reproduced[1]
    assert ran_stages(first) == ["fetch", "prepare", "train", "evaluate", "export"]
    assert "prepare: wrote data/prepared (mnist, 28x28x1, train 400, val 100, test 500)" in first
    again = sh(repo, "dvc", "repro")
    assert ran_stages(again) == []
    assert "Data and pipelines are up to date." in again
    assert "Data and pipelines are up to date." in sh(repo, "dvc", "status")
    assert sh(repo, "git", "status", "--porcelain") == ""  # the model file hashes the same
    per_class = json.loads((repo / "data/evaluate/per_class.json").read_text())
    assert sum(c["support"] for c in per_class.values()) == 500  # prepare.test_size
    # Outputs DVC caches are ignored by git, train's history too (so that the run cache can
    # restore train); evaluate's metrics and plots are committed.
    tracked = sh(repo, "git", "ls-files", "data").split()
    committed = ("metrics.json", "per_class.json", "plots/curves.png")
    assert {f"data/evaluate/{name}" for name in committed} <= set(tracked)
    cached = ("data/raw/", "data/prepared/", "data/model/model", "data/train/")
    assert not [f for f in tracked if f.startswith(cached)]
    # `dvc exp show` and `dvc metrics diff` carry the headline metrics, a dozen columns.
    workspace = json.loads(sh(repo, "dvc", "exp", "show", "--json"))[0]["data"]["metrics"]
    columns = {path: sorted(leaves(m["data"])) for path, m in workspace.items()}
    assert columns == {
        "data/train/metrics.json": [
            "eval.accuracy",
            "eval.loss",
            "step",
            "train.accuracy",
            "train.loss",
        ],
        "data/evaluate/metrics.json": ["accuracy", "dtype_policy", "errors", "loss"],
        "data/export/metrics.json": [
            "differing_classes",
            "max_abs_diff",
            "max_abs_diff_vs_trained",
        ],
    }


def leaves(tree, prefix=""):
    """Flattened keys of a nested dict, as DVC names its columns: "eval.accuracy"."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield prefix + key


def test_a_forced_rerun_reproduces_the_lock_file_byte_for_byte(repo):
    lock = (repo / "dvc.lock").read_bytes()
    output = sh(repo, "dvc", "repro", "--force", "--single-item", "train")
    assert ran_stages(output) == ["train"]
    assert (repo / "dvc.lock").read_bytes() == lock  # same weights -> same model.keras hash


def test_changing_epochs_reruns_only_train_and_what_follows(branches):
    status = " ".join(branches.status.split())
    assert "train: changed deps: params.yaml: modified: train.epochs" in status
    assert sorted(ran_stages(branches.output)) == ["evaluate", "export", "train"]
    assert "Stage 'prepare' didn't change, skipping" in branches.output


def test_where_mnist_comes_from_and_another_stages_schema_rerun_nothing_after(repo):
    # Every file is accepted by its checksum: the timeout is no param, and another mirror
    # in the dataset's description reruns fetch, whose output is the same, and nothing else.
    edit_params(repo / "params.yaml", fetch__timeout_s=5)
    assert "Data and pipelines are up to date." in sh(repo, "dvc", "status")
    described = (repo / "data/mnist.yaml").read_text()
    (repo / "data/mnist.yaml").write_text(described.replace("storage.googleapis", "example"))
    assert ran_stages(sh(repo, "dvc", "repro")) == ["fetch"]
    # Each stage declares its own section's schema: a new export key reruns export only.
    code = (repo / "stages/export.py").read_text()
    declared = "    batch_size: int = Field(ge=1)"
    assert declared in code
    new = code.replace(declared, "    batch_size: int = Field(ge=1, le=100_000)")
    (repo / "stages/export.py").write_text(new)
    status = " ".join(sh(repo, "dvc", "status").split())
    assert status.startswith("export: changed deps: modified: stages/export.py")
    assert "train:" not in status and "evaluate:" not in status


def test_changing_validation_split_reruns_prepare_and_what_follows(repo):
    edit_params(repo / "params.yaml", prepare__validation_split=0.3)
    assert "prepare:" in sh(repo, "dvc", "status")
    output = sh(repo, "dvc", "repro")
    assert sorted(ran_stages(output)) == ["evaluate", "export", "prepare", "train"]
    assert "prepare: wrote data/prepared (mnist, 28x28x1, train 350, val 150, test 500)" in output
    # Back to the committed state: git restores params and metrics, DVC the cached data.
    sh(repo, "git", "checkout", "--", ".")
    sh(repo, "dvc", "checkout")
    assert "Data and pipelines are up to date." in sh(repo, "dvc", "status")


def test_a_rejected_param_fails_at_once_and_dvc_checkout_restores_the_model(repo):
    model = (repo / "data/model/model.keras").read_bytes()
    edit_params(repo / "params.yaml", train__epochs=0)
    code, output = run(repo, "dvc", "repro")
    assert code != 0
    assert "Error: params.yaml: train.epochs must be an integer >= 1 or preset, got 0" in output
    assert "oneDNN" not in output  # TensorFlow prints this line as it loads

    assert not (repo / "data/model/model.keras").exists()  # DVC removed it before the run
    sh(repo, "git", "checkout", "--", "params.yaml")
    sh(repo, "dvc", "checkout")
    assert (repo / "data/model/model.keras").read_bytes() == model


def test_metrics_and_params_diff_between_branches(branches):
    repo = branches.repo
    params = json.loads(sh(repo, "dvc", "params", "diff", "main", "--json"))
    assert params == {"params.yaml": {"train.epochs": {"old": 1, "new": 2, "diff": 1}}}
    old = json.loads(sh(repo, "git", "show", "main:data/evaluate/metrics.json"))
    new = json.loads((repo / "data/evaluate/metrics.json").read_text())
    metrics = json.loads(sh(repo, "dvc", "metrics", "diff", "main", "--all", "--json"))
    accuracy = metrics["data/evaluate/metrics.json"]["accuracy"]
    assert (accuracy["old"], accuracy["new"]) == (old["accuracy"], new["accuracy"])
    steps = metrics["data/train/metrics.json"]["step"]
    assert (steps["old"], steps["new"]) == (1, 2)  # epochs counted from 1, as curves.png does


def test_plots_diff_draws_both_revisions(branches):
    repo = branches.repo
    plots = json.loads(sh(repo, "dvc", "plots", "diff", "main", "--json", "--split"))["data"]
    assert {"Loss", "Accuracy", "data/evaluate/confusion.csv"} <= set(plots)
    assert set(plots["Loss"][0]["revisions"]) == {"main", "workspace"}
    images = sorted(k for k in plots if k.startswith("data/evaluate/plots/"))
    assert [k.rsplit("/", 1)[1] for k in images] == ["confusion.png", "curves.png", "errors.png"]
    for key in images:
        assert {r for image in plots[key] for r in image["revisions"]} == {"main", "workspace"}


def test_report_gives_the_exact_accuracy_delta_and_the_changed_param(branches, tmp_path):
    repo = branches.repo
    out = tmp_path / "report.md"
    output = sh(repo, sys.executable, "-m", "tools.report", "--base", "main", "--out", out)
    text = out.read_text()
    old = json.loads(sh(repo, "git", "show", "main:data/evaluate/metrics.json"))["accuracy"]
    new = json.loads((repo / "data/evaluate/metrics.json").read_text())["accuracy"]
    assert f"| accuracy | {old:.4f} | {new:.4f} | {new - old:+.4f} |" in text
    assert "| `train.epochs` | 1 | 2 |" in text
    assert "report: **Test accuracy" in output
    for png in ("curves.png", "confusion.png", "errors.png"):
        figure = repo / "data/evaluate/plots" / png
        assert f"({os.path.relpath(figure, tmp_path)})" in text
        assert figure.read_bytes()[:4] == b"\x89PNG"


def test_report_against_a_base_without_metrics_fails_clearly(branches):
    repo = branches.repo
    first = sh(repo, "git", "rev-list", "--max-parents=0", "HEAD").strip()
    result = subprocess.run(
        [sys.executable, "-m", "tools.report", "--base", first, "--out", os.devnull],
        cwd=repo,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"Error: base revision '{first}' has no data/evaluate/metrics.json; "
        "reproduce and commit it there first"
    )


def test_exp_run_changes_one_line_of_params_and_is_listed(repo):
    sh(repo, "dvc", "exp", "run", "-n", "lr-half", "-S", "train.learning_rate=0.005", "evaluate")
    diff = sh(repo, "git", "diff", "-U0", "params.yaml").splitlines()
    changed = [line for line in diff if line[:1] in "+-" and line[:3] not in ("+++", "---")]
    assert changed == [
        next(line for line in changed if line.startswith("-  learning_rate: preset ")),
        next(line for line in changed if line.startswith("+  learning_rate: 0.005 ")),
    ]
    params, accuracy = shown_experiments(repo)["lr-half"]
    assert params["learning_rate"] == 0.005
    assert accuracy == json.loads((repo / "data/evaluate/metrics.json").read_text())["accuracy"]


def test_queued_experiments_run_with_their_own_overrides(repo, tmp_path):
    # Up to train, which reads the overrides (evaluate would add 5 s to each).
    sh(repo, "dvc", "exp", "run", "--queue", "-n", "seed-7", "-S", "train.seed=7", "train")
    sh(repo, "dvc", "exp", "run", "--queue", "-n", "seed-8", "-S", "train.seed=8", "train")
    # --run-all starts a queue worker in the background that inherits its stdout; a race in
    # dvc-task (a half-written message file) can keep that worker alive, idle, after the
    # queue is done. So: output to a file, not to a pipe that stays open, then stop it.
    with (tmp_path / "run-all.log").open("w") as log:
        subprocess.run(
            ["dvc", "exp", "run", "--run-all"],
            cwd=repo,
            env=user_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            check=True,
            timeout=900,
        )
    sh(repo, "dvc", "queue", "stop")
    found = shown_experiments(repo)
    assert (found["seed-7"][0]["seed"], found["seed-8"][0]["seed"]) == (7, 8)
    assert found["seed-7"][0]["epochs"] == 1  # the rest as committed
    assert sh(repo, "git", "status", "--porcelain") == ""  # the workspace is untouched


def test_ci_script_reproduces_with_overrides_and_writes_the_report(repo):
    output = sh(repo, "bash", ".ci/train-report", "main", "train.learning_rate=0.02")
    assert sorted(ran_stages(output)) == ["evaluate", "export", "train"]
    text = (repo / "report.md").read_text()
    assert "| `train.learning_rate` | preset | 0.02 |" in text
    assert "**Test accuracy" in text


def test_ci_script_finds_a_bare_base_branch_on_origin(repo, tmp_path):
    clone = tmp_path / "runner"
    sh(tmp_path, "git", "clone", "-q", str(repo), str(clone))
    sh(clone, "git", "checkout", "-q", "-b", "feature")
    sh(clone, "git", "branch", "-D", "main")  # a runner's checkout: only origin/main
    shutil.copytree(repo / ".dvc" / "cache", clone / ".dvc" / "cache")
    sh(clone, "dvc", "checkout")
    output = sh(clone, "bash", ".ci/train-report", "main")  # no overrides: nothing to rerun
    assert ran_stages(output) == []
    assert "(against `origin/main`)" in output
    assert "| accuracy |" in (clone / "report.md").read_text()
