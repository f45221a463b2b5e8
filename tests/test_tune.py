"""tools/tune: the search file's checks, the trial table, and real searches on the tiny
pipeline, each trial a `dvc exp run`: resumed from SQLite, pruned, interrupted, a worker
killed, and two workers on one study in a real PostgreSQL server (started here on
127.0.0.1 from Debian's `postgresql` package, as an unprivileged user, and stopped)."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from PIL import Image

from tests.conftest import (
    HAVE_MNIST,
    ROOT,
    build_once,
    clone,
    commit,
    copy_project,
    copy_reproduced,
    edit_params,
    free_port,
    git_identity,
    run,
    sh,
    shown_experiments,
    user_env,
)
from tools import tune

# Debian's postgresql package, whichever version (Debian 12: 15); .ci/run installs it.
PG_BINS = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
PG_BIN = PG_BINS[-1].parent if PG_BINS else None
needs_mnist = pytest.mark.skipif(not HAVE_MNIST, reason="offline MNIST mirror not present")

# The tiny pipeline's search: two dimensions, short trials, heartbeats every second.
TINY = {
    "study": "tiny",
    "stage": "evaluate",
    "seed": 0,
    "objective": {"metric": "eval/accuracy", "direction": "maximize"},
    "max_fit_s": None,
    "budget": {"trials": 2, "minutes": None},
    "pruner": {"kind": "none"},
    "heartbeat_s": 1,
    "fixed": {"prepare.validation_split": 0.2},
    "space": {
        "train.epochs": {"low": 1, "high": 2},
        "train.learning_rate": {"low": 0.001, "high": 0.05, "log": True},
    },
}


def space_file(path, **changes):
    doc = {**TINY, **changes}
    Path(path).write_text(yaml.safe_dump(doc, sort_keys=False))
    return Path(path)


def tune_cmd(space, out, *flags):
    return [sys.executable, "-m", "tools.tune", "--space", space, "--out", out, *flags]


def load(url, study="tiny"):
    return optuna.load_study(study_name=study, storage=tune.open_storage(url, 1))


def exp_refs(repo):
    return sh(repo, "git", "for-each-ref", "--format=%(refname)", "refs/exps").split()


def experiments(repo):
    """The names of the repo's experiments (refs/exps/<base>/<name>, not DVC's exec refs)."""
    return [r.rsplit("/", 1)[1] for r in exp_refs(repo) if not r.startswith("refs/exps/exec/")]


def exp_run_entries(repo):
    root = Path(repo) / ".dvc/tmp/exps"
    return sorted(
        str(p.relative_to(root)) for sub in ("run", "cache") for p in (root / sub).glob("*")
    )


def assert_as_committed(repo):
    """Nothing changed in git's files, no train scratch, DVC's outputs match dvc.lock."""
    assert sh(repo, "git", "status", "--porcelain") == ""
    assert not (Path(repo) / "data/checkpoint").exists()
    assert "Data and pipelines are up to date." in sh(repo, "dvc", "status")


# --- the search file ------------------------------------------------------------------------


def test_the_committed_search_file_names_real_params_keys_and_a_dvc_stage(monkeypatch):
    monkeypatch.chdir(ROOT)
    search = tune.load_search("tools/tune.yaml")
    assert set(search.space) == {"train.epochs", "train.batch_size", "train.learning_rate"}
    assert search.fixed["train.model"] == "fast"
    assert search.fixed["prepare.validation_split"] > 0  # the objective needs a validation split
    assert search.objective.metric.startswith("eval/")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"space": {"train.lr": {"low": 0.1, "high": 1.0}}},
            "space.train.lr: not a key of params.yaml",
        ),
        (
            {"space": {"train.learning_rate": {"low": 0.1, "high": 0.01}}},
            "space.train.learning_rate: low must be below high, got low=0.1, high=0.01",
        ),
        (
            {"space": {"train.learning_rate": {"low": 0, "high": 0.1, "log": True}}},
            "space.train.learning_rate: a log scale needs low > 0, got low=0",
        ),
        (
            {"space": {"train.batch_size": {"choices": []}}},
            "space.train.batch_size: choices is empty",
        ),
        (
            {"space": {"train.epochs": {"low": 1, "high": 3, "choices": [1]}}},
            "space.train.epochs: give either choices or low and high, not both",
        ),
        ({"space": {"train.epochs": {"low": 1, "hihg": 3}}}, "unknown key space.train.epochs.hihg"),
        (
            {"fixed": {"train.epochs": 2}},
            "space.train.epochs: also in fixed; give it in one of the two",
        ),
        ({"stage": "trian"}, "stage: no stage 'trian' in dvc.yaml"),
        (
            {"budget": {"trials": 0, "minutes": None}},
            "budget.trials: Input should be greater than or equal to 1, got 0",
        ),
        (
            {"objective": {"metric": "eval/accuracy", "direction": "up"}},
            "objective.direction: Input should be 'maximize' or 'minimize', got 'up'",
        ),
        (
            {"objective": {"metric": "eval/acc", "direction": "maximize"}},
            "objective.metric: Input should be 'eval/accuracy', 'eval/loss', 'train/accuracy' "
            "or 'train/loss', got 'eval/acc'",
        ),
    ],
)
def test_a_bad_search_file_is_one_line_naming_the_key(tmp_path, change, message):
    project = copy_project(tmp_path / "project")
    space = space_file(tmp_path / "space.yaml", **change)
    code, output = run(project, *tune_cmd(space, tmp_path / "out"))
    assert (code, output) == (1, f"Error: {space}: {message}\n")
    assert not (tmp_path / "out").exists()


def test_a_search_file_that_is_not_yaml_is_one_line(tmp_path):
    project = copy_project(tmp_path / "project")
    space = tmp_path / "space.yaml"
    space.write_text("study: tiny\nspace: {train.epochs: [1, 2}\n")
    code, output = run(project, *tune_cmd(space, tmp_path / "out"))
    assert (code, output) == (
        1,
        f"Error: {space}: not valid YAML at line 2: expected ',' or ']', but got '}}'\n",
    )


def test_an_unreachable_database_is_one_line_and_exit_1(tmp_path):
    project = copy_project(tmp_path / "project")
    port = free_port()  # nothing listens there
    url = f"postgresql://tune:secret@127.0.0.1:{port}/tune"
    code, output = run(
        project, *tune_cmd(space_file(tmp_path / "s.yaml"), tmp_path / "o", "--storage", url)
    )
    assert code == 1
    assert output == (
        f"Error: cannot reach the study database postgresql://tune:***@127.0.0.1:{port}/tune: "
        f'connection to server at "127.0.0.1", port {port} failed: Connection refused\n'
    )


# --- pieces ---------------------------------------------------------------------------------


def test_history_is_read_in_whole_lines():
    assert tune.epoch_rows("step\taccuracy\n1\t0.5\n2\t0.75\n3\t0.8") == [(1, 0.5), (2, 0.75)]
    assert tune.epoch_rows("step\taccuracy\n1\t0.5\n") == [(1, 0.5)]  # epoch 2 is not begun
    assert tune.epoch_rows("") == []


def test_fit_time_is_the_train_stage_line():
    log = "Running stage 'train':\ntrain: preset fast\ntrain: fit took 3.61 s\ntrain: saved x\n"
    assert tune.fit_seconds(log) == 3.61
    assert tune.fit_seconds("Stage 'train' is cached - skipping run\n") is None


def test_overrides_are_spelled_as_yaml():
    flags = tune.set_flags({"train.model": "fast", "train.learning_rate": 0.001, "x.y": None})
    assert flags == ["-S", "train.model=fast", "-S", "train.learning_rate=0.001", "-S", "x.y=null"]


def test_the_table_sorts_complete_then_over_time_then_pruned_then_failed():
    search = tune.Search.model_validate({**TINY, "max_fit_s": 5})
    study = optuna.create_study(direction="maximize")
    dist = {
        "train.epochs": optuna.distributions.IntDistribution(1, 2),
        "train.learning_rate": optuna.distributions.FloatDistribution(0.001, 0.05, log=True),
    }
    State = optuna.trial.TrialState

    def add(state, value, fit, epochs, lr, steps=None):
        attrs = {
            "experiment": f"tiny-{len(study.trials)}",
            "fit_s": fit,
            "epochs": epochs,
            "test_accuracy": None if value is None else value - 0.01,
        }
        study.add_trial(
            optuna.trial.create_trial(
                state=state,
                value=value,
                params={"train.epochs": epochs, "train.learning_rate": lr},
                distributions=dist,
                user_attrs=attrs,
                intermediate_values=steps or {},
            )
        )

    add(State.COMPLETE, 0.9, 4.0, 2, 0.01)
    add(State.PRUNED, None, None, 1, 0.002, {1: 0.4})
    add(State.COMPLETE, 0.95, 6.5, 2, 0.02)  # better, but over max_fit_s
    add(State.COMPLETE, 0.92, 3.0, 1, 0.03)
    add(State.FAIL, None, None, 2, 0.004)
    assert tune.trial_table(study, search).splitlines() == [
        "| trial | state | eval/accuracy (validation) | test accuracy | fit s | epochs "
        "| train.epochs | train.learning_rate | experiment |",
        "|---|---|---|---|---|---|---|---|---|",
        "| 3 | complete | 0.9200 | 0.9100 | 3.00 | 1 | 1 | 0.0300 | tiny-3 |",
        "| 0 | complete | 0.9000 | 0.8900 | 4.00 | 2 | 2 | 0.0100 | tiny-0 |",
        "| 2 | complete, over 5 s | 0.9500 | 0.9400 | 6.50 | 2 | 2 | 0.0200 | tiny-2 |",
        "| 1 | pruned at epoch 1 | 0.4000 |  |  | 1 | 1 | 0.0020 |  |",
        "| 4 | fail |  |  |  | 2 | 2 | 0.0040 |  |",
    ]
    assert tune.ranked(study, search)[0].number == 3  # the best


# --- real searches on the tiny pipeline -------------------------------------------------------


@needs_mnist
@pytest.mark.slow
def test_a_pruned_trial_leaves_no_experiment_and_a_rerun_resumes_the_study(reproduced, tmp_path):
    repo = copy_reproduced(reproduced, tmp_path / "p")
    out = tmp_path / "out"
    url = f"sqlite:///{out / 'tiny.db'}"
    # No run of 400 tiny images reaches 99%: the first epoch prunes the trial, whose other
    # epochs (many, so that it is still running then) never run.
    pruning = {"kind": "threshold", "lower": 0.99}
    space = space_file(
        tmp_path / "s.yaml",
        pruner=pruning,
        budget={"trials": 1, "minutes": None},
        space={**TINY["space"], "train.epochs": {"low": 100, "high": 200}},
    )
    sh(repo, *tune_cmd(space, out))
    (pruned,) = load(url).trials
    assert pruned.state == optuna.trial.TrialState.PRUNED
    assert list(pruned.intermediate_values) == [1]
    assert exp_refs(repo) == []
    assert_as_committed(repo)
    # The same study, one trial more, nothing pruned: only the new trial runs.
    output = sh(
        repo, *tune_cmd(space_file(tmp_path / "s.yaml", budget={"trials": 2, "minutes": None}), out)
    )
    pruned, done = load(url).trials
    assert (pruned.state.name, done.state.name) == ("PRUNED", "COMPLETE")
    assert experiments(repo) == ["tiny-1"]
    assert "Restore it:   dvc exp apply tiny-1\n" in output
    assert f"Its test accuracy: {done.user_attrs['test_accuracy']:.4f}\n" in output
    assert_as_committed(repo)
    table = (out / "trials.md").read_text().splitlines()
    assert table[2].startswith(f"| 1 | complete | {done.value:.4f} |")
    assert table[3].startswith("| 0 | pruned at epoch 1 |")
    sh(repo, "dvc", "exp", "apply", "tiny-1")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["train"]["epochs"] == done.params["train.epochs"]
    assert params["train"]["learning_rate"] == done.params["train.learning_rate"]
    metrics = json.loads((repo / "data/evaluate/metrics.json").read_text())
    assert metrics["accuracy"] == done.user_attrs["test_accuracy"]


@needs_mnist
@pytest.mark.slow
def test_a_failed_trial_is_recorded_failed_and_stops_the_search_with_one_line(reproduced, tmp_path):
    repo = copy_reproduced(reproduced, tmp_path / "p")
    out = tmp_path / "out"
    # The train stage's params check rejects 0 epochs before it imports TensorFlow.
    space = space_file(
        tmp_path / "s.yaml", space={**TINY["space"], "train.epochs": {"choices": [0]}}
    )
    before = exp_run_entries(repo)
    code, output = run(repo, *tune_cmd(space, out))
    log = out / "logs" / "tiny-0.log"
    assert code == 1
    errors = [line for line in output.splitlines() if "Error" in line or "Traceback" in line]
    assert errors == [
        f"Error: trial 0: `dvc exp run` exited 255: ERROR: failed to reproduce 'train': "
        f"failed to run: python -m stages.train --data data/prepared "
        f"--model data/model/model.keras --live data/train --checkpoint data/checkpoint, "
        f"exited with 1 (log: {log})"
    ]
    assert (
        "Error: params.yaml: train.epochs must be an integer >= 1 or preset, got 0"
        in log.read_text()
    )
    (failed,) = load(f"sqlite:///{out / 'tiny.db'}").trials
    assert (failed.state.name, failed.params["train.epochs"]) == ("FAIL", 0)
    assert failed.user_attrs["experiment"] == "tiny-0"
    assert not (out / "trials.md").exists()
    # No experiment. DVC keeps its record of the failed run (.dvc/tmp/exps/run/<id>), as
    # after a failed `dvc exp run --temp` typed by hand.
    assert experiments(repo) == []
    assert len(set(exp_run_entries(repo)) - set(before)) == 1
    assert_as_committed(repo)


def start_tune(repo, space, out, *flags):
    log = (Path(out).parent / f"{Path(out).name}.log").open("w")
    return subprocess.Popen(
        tune_cmd(space, out, *flags),
        cwd=repo,
        env=user_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_for_train(out, name, timeout=120):
    """Waits until the trial's log shows the train stage fitting (tune runs the stages
    unbuffered, so the line is there as Keras prints it)."""
    log = Path(out) / "logs" / f"{name}.log"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and "Epoch 1/" in log.read_text():
            return
        time.sleep(0.2)
    raise AssertionError(
        f"trial {name} did not start training:\n{log.read_text() if log.exists() else ''}"
    )


@needs_mnist
@pytest.mark.slow
def test_ctrl_c_stops_the_trial_and_leaves_no_half_made_experiment(reproduced, tmp_path):
    repo = copy_reproduced(reproduced, tmp_path / "p")
    out = tmp_path / "out"
    space = space_file(
        tmp_path / "s.yaml", space={**TINY["space"], "train.epochs": {"low": 100, "high": 200}}
    )
    proc = start_tune(repo, space, out)
    wait_for_train(out, "tiny-0")
    os.kill(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the tune process
    assert proc.wait(60) == 130
    last = Path(f"{out}.log").read_text().strip().splitlines()[-1]
    assert last == (
        "Interrupted: the running trial is marked failed and its outputs are gone; "
        "rerun the same command to resume 'tiny'"
    )
    assert [t.state.name for t in load(f"sqlite:///{out / 'tiny.db'}").trials] == ["FAIL"]
    assert exp_refs(repo) == []
    assert_as_committed(repo)


@needs_mnist
@pytest.mark.slow
def test_a_killed_worker_s_trial_is_marked_failed_and_retried_by_another(reproduced, tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"  # both workers on this machine
    space = space_file(tmp_path / "s.yaml", budget={"trials": 1, "minutes": None})
    a = copy_reproduced(reproduced, tmp_path / "a")
    b = copy_reproduced(reproduced, tmp_path / "b")
    worker = start_tune(a, space, tmp_path / "out-a", "--storage", url)
    wait_for_train(tmp_path / "out-a", "tiny-0")
    os.killpg(worker.pid, signal.SIGKILL)  # the machine dies: tune, dvc and the stage
    worker.wait()
    time.sleep(3.5)  # > 3 heartbeats of 1 s
    sh(b, *tune_cmd(space, tmp_path / "out-b", "--storage", url, "--worker", "2"))
    killed, retried = load(url).trials
    assert (killed.state.name, retried.state.name) == ("FAIL", "COMPLETE")
    assert retried.params == killed.params
    assert retried.system_attrs["failed_trial"] == 0  # RetryHeartbeatStaleTrialCallback's mark
    assert experiments(b) == ["tiny-1"]
    assert_as_committed(b)


# --- the user's workspace is never written -----------------------------------------------------


def build_images_project(repo):
    """A project on a `dvc add`-ed folder of images, data/images: 10 images of each of two
    classes (a bright square at the top or at the bottom), reproduced up to evaluate and
    committed. Returns the line fetch printed."""
    copy_project(repo)
    rng = np.random.default_rng(0)
    for label, row in (("top", 2), ("bottom", 18)):
        (repo / "data/images" / label).mkdir(parents=True)
        for i in range(10):
            pixels = rng.integers(0, 60, (28, 28), dtype=np.uint8)
            pixels[row : row + 8, 10:18] = 255
            Image.fromarray(pixels).save(repo / "data/images" / label / f"{i}.png")
    edit_params(
        repo / "params.yaml",
        fetch__source="data/images",
        train__model="fast",
        train__batch_size=8,
        evaluate__gallery_size=2,
    )
    sh(repo, "git", "init", "-q", "-b", "main")
    git_identity(repo)
    sh(repo, "dvc", "init", "-q")
    sh(repo, "dvc", "add", "-q", "data/images")
    commit(repo, "project on my images")
    output = sh(repo, "dvc", "repro", "evaluate")
    commit(repo, "baseline")
    return {"fetch": next(line for line in output.splitlines() if line.startswith("fetch: "))}


@pytest.fixture(scope="module")
def images_project(tmp_path_factory, worker_id):
    return build_once(tmp_path_factory, worker_id, "tune-images", build_images_project)


def mid_work(images_project, dest):
    """A copy of the images project as a user has it mid-work: an image fixed in place and
    one added beside it (neither `dvc add`-ed again), a param changed (not committed), a
    file git does not track and one it ignores. Returns (path, what `snapshot` says)."""
    repo = copy_reproduced(images_project, dest)
    Image.new("L", (28, 28), 255).save(repo / "data/images/top/0.png")
    Image.new("L", (28, 28), 128).save(repo / "data/images/top/new.png")
    edit_params(repo / "params.yaml", evaluate__gallery_size=3)
    (repo / "notes.txt").write_text("what I tried\n")
    (repo / "report.md").write_text("ignored by git\n")
    return repo, snapshot(repo)


def snapshot(repo):
    """{path: sha256} of every file of the project (DVC's cache included) but git's and
    DVC's bookkeeping (.git, .dvc/tmp); and what git says of the workspace."""
    files = {}
    for folder, dirs, names in os.walk(repo):
        dirs[:] = [d for d in dirs if Path(folder, d) not in (repo / ".git", repo / ".dvc/tmp")]
        for name in names:
            path = Path(folder, name)
            files[str(path.relative_to(repo))] = hashlib.sha256(path.read_bytes()).hexdigest()
    git = [
        sh(repo, "git", *args)
        for args in (["status", "--porcelain"], ["stash", "list"], ["symbolic-ref", "HEAD"])
    ]
    return files, git


def assert_untouched(repo, before):
    """Every file the user had is as it was; the only new files are DVC's cache objects (the
    trials' outputs and the edited images) and Python's bytecode caches."""
    (files, git), (now, git_now) = before, snapshot(repo)
    assert {path: now.get(path) for path in files} == files
    new = [p for p in now if p not in files and not p.startswith(".dvc/cache/")]
    assert [p for p in new if "__pycache__" not in p] == []
    assert git_now == git


# 11 images of `top` hold 2 out (fetch.test_split 0.2), 10 of `bottom` 2: 9 + 8 to train.
EDITED = "fetch: data/images: 2 classes (bottom, top), 17 training and 4 test images"


@pytest.mark.slow
def test_a_complete_search_leaves_every_file_as_it_was_and_trains_on_the_user_s_images(
    images_project, tmp_path
):
    repo, before = mid_work(images_project, tmp_path / "p")
    assert images_project[1]["fetch"].endswith("16 training and 4 test images")
    out = tmp_path / "out"
    sh(repo, *tune_cmd(space_file(tmp_path / "s.yaml", budget={"trials": 1, "minutes": None}), out))
    assert_untouched(repo, before)
    assert experiments(repo) == ["tiny-0"]
    assert EDITED in (out / "logs" / "tiny-0.log").read_text()
    params = yaml.safe_load(sh(repo, "git", "show", f"{exp_refs(repo)[0]}:params.yaml"))
    assert params["evaluate"]["gallery_size"] == 3  # the user's uncommitted param


@pytest.mark.slow
def test_a_pruned_trial_leaves_every_file_as_it_was(images_project, tmp_path):
    repo, before = mid_work(images_project, tmp_path / "p")
    space = space_file(
        tmp_path / "s.yaml",
        pruner={"kind": "threshold", "lower": 1.01},
        budget={"trials": 1, "minutes": None},
        space={**TINY["space"], "train.epochs": {"low": 100, "high": 200}},
    )
    sh(repo, *tune_cmd(space, tmp_path / "out"))
    (pruned,) = load(f"sqlite:///{tmp_path / 'out' / 'tiny.db'}").trials
    assert (pruned.state.name, list(pruned.intermediate_values)) == ("PRUNED", [1])
    assert_untouched(repo, before)
    assert exp_refs(repo) == []


@pytest.mark.slow
def test_a_failed_trial_leaves_every_file_as_it_was(images_project, tmp_path):
    repo, before = mid_work(images_project, tmp_path / "p")
    space = space_file(
        tmp_path / "s.yaml", space={**TINY["space"], "train.epochs": {"choices": [0]}}
    )
    code, output = run(repo, *tune_cmd(space, tmp_path / "out"))
    assert code == 1 and output.splitlines()[-1].startswith("Error: trial 0: `dvc exp run` exited")
    assert_untouched(repo, before)


@pytest.mark.slow
def test_ctrl_c_leaves_every_file_as_it_was(images_project, tmp_path):
    repo, before = mid_work(images_project, tmp_path / "p")
    space = space_file(
        tmp_path / "s.yaml", space={**TINY["space"], "train.epochs": {"low": 100, "high": 200}}
    )
    proc = start_tune(repo, space, tmp_path / "out")
    wait_for_train(tmp_path / "out", "tiny-0")
    os.kill(proc.pid, signal.SIGINT)
    assert proc.wait(60) == 130
    assert_untouched(repo, before)
    assert exp_refs(repo) == []


@pytest.mark.slow
def test_kill_9_of_tune_leaves_every_file_as_it_was(images_project, tmp_path):
    repo, before = mid_work(images_project, tmp_path / "p")
    space = space_file(
        tmp_path / "s.yaml", space={**TINY["space"], "train.epochs": {"choices": [2]}}
    )
    proc = start_tune(repo, space, tmp_path / "out")
    wait_for_train(tmp_path / "out", "tiny-0")
    os.kill(proc.pid, signal.SIGKILL)  # tune alone: its trial's `dvc exp run` runs on, in its copy
    proc.wait()
    assert_untouched(repo, before)
    deadline = time.monotonic() + 300
    while experiments(repo) != ["tiny-0"]:  # the trial ends, saved as DVC saves any run
        assert time.monotonic() < deadline, "the orphaned trial did not finish"
        time.sleep(1)
    assert_untouched(repo, before)


def test_tune_refuses_a_dvc_file_that_git_does_not_track(reproduced, tmp_path):
    repo = copy_reproduced(reproduced, tmp_path / "p")
    (repo / "data/labels").mkdir()
    (repo / "data/labels/a.txt").write_text("a\n")
    sh(repo, "dvc", "add", "-q", "data/labels")  # and forgot to `git add data/labels.dvc`
    code, output = run(repo, *tune_cmd(space_file(tmp_path / "s.yaml"), tmp_path / "out"))
    assert (code, output) == (
        1,
        "Error: data/labels.dvc: not in git, so not in a trial's copy, and DVC would "
        "rewrite it; `git add` it first\n",
    )
    assert list((tmp_path / "out" / "logs").iterdir()) == []  # no trial ran


def test_launch_finds_the_copy_of_a_dvc_exp_run_temp(tmp_path, monkeypatch):
    """tools.tune finds a running trial's copy where DVC makes it (.dvc/tmp/exps/standalone),
    which is not a public API: this fails if an upgrade of DVC moves it."""
    repo = tmp_path / "toy"
    repo.mkdir()
    sh(repo, "git", "init", "-q", "-b", "main")
    git_identity(repo)
    sh(repo, "dvc", "init", "-q")
    (repo / "params.yaml").write_text("n: 1\n")
    slow = "import pathlib, time; pathlib.Path('seen').write_text('n'); time.sleep(60)"
    stage = {"cmd": f'python -c "{slow}"', "params": ["n"], "outs": ["seen"]}
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"wait": stage}}))
    commit(repo, "toy")
    monkeypatch.chdir(repo)
    monkeypatch.setenv("PATH", user_env()["PATH"])
    with (tmp_path / "log").open("w") as log:
        proc, copy = tune.launch(["dvc", "exp", "run", "--temp", "-n", "toy-0", "-S", "n=2"], log)
    try:
        from dvc import __version__ as dvc_version

        moved = f"DVC {dvc_version} made no copy in {tune.COPIES}: tools/tune.py must follow it"
        assert copy is not None and (repo / copy).parent == repo / tune.COPIES, moved
        deadline = time.monotonic() + 60
        while not (copy / "seen").exists():
            assert time.monotonic() < deadline, (tmp_path / "log").read_text()
            time.sleep(0.2)
        assert yaml.safe_load((copy / "params.yaml").read_text()) == {"n": 2}
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # as tune stops a trial
        proc.wait()
    assert not copy.exists()  # DVC removed its copy of the stopped run


# --- two workers, one PostgreSQL study --------------------------------------------------------


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server on 127.0.0.1 in a temporary directory; yields its database URL.
    initdb refuses root, so under root the server runs as Debian's `postgres` user."""
    if PG_BIN is None:
        if os.environ.get("REQUIRE_POSTGRES"):
            raise AssertionError(
                "REQUIRE_POSTGRES is set but /usr/lib/postgresql/*/bin/initdb is missing"
            )
        pytest.skip("no PostgreSQL server (Debian's postgresql package)")
    as_user = ["runuser", "-u", "postgres", "--"] if os.getuid() == 0 else []
    home = Path(tempfile.mkdtemp(prefix="tune-pg-"))
    if as_user:
        shutil.chown(home, "postgres")
    data, port = home / "data", free_port()

    def pg(*cmd):
        subprocess.run([*as_user, *cmd], check=True, capture_output=True)

    pg(PG_BIN / "initdb", "-D", data, "-U", "tune", "--auth=trust")
    pg(
        PG_BIN / "pg_ctl",
        "-D",
        data,
        "-l",
        home / "server.log",
        "-w",
        "start",
        "-o",
        f"-h 127.0.0.1 -p {port} -k {home}",
    )
    yield f"postgresql://tune@127.0.0.1:{port}/postgres"
    pg(PG_BIN / "pg_ctl", "-D", data, "-m", "immediate", "stop")
    shutil.rmtree(home, ignore_errors=True)


@needs_mnist
@pytest.mark.slow
def test_two_workers_share_a_postgresql_study_and_a_third_clone_sees_every_trial(
    postgres,
    machine_a,
    tmp_path,
):
    _, origin = machine_a
    space = space_file(tmp_path / "s.yaml", budget={"trials": 2, "minutes": None})
    workers = []
    for k in (1, 2):
        repo = clone(origin, tmp_path / f"w{k}")
        sh(repo, "dvc", "pull")
        proc = start_tune(
            repo,
            space,
            tmp_path / f"out{k}",
            "--storage",
            postgres,
            "--worker",
            str(k),
            "--push",
            "origin",
        )
        workers.append((repo, proc))
    for k, (repo, proc) in enumerate(workers, 1):
        assert proc.wait(300) == 0, Path(f"{tmp_path}/out{k}.log").read_text()
        assert_as_committed(repo)
    trials = load(postgres).trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 2
    names = [t.user_attrs["experiment"] for t in trials]
    assert names == ["tiny-0", "tiny-1"]
    ran = {k: len(list((tmp_path / f"out{k}" / "logs").glob("*.log"))) for k in (1, 2)}
    assert sorted(ran.values()) in ([1, 1], [0, 2]) and sum(ran.values()) == 2  # each trial once
    third = clone(origin, tmp_path / "third")
    sh(third, "dvc", "exp", "pull", "origin")
    shown = shown_experiments(third)
    assert sorted(shown) == names
    for t in trials:
        params, accuracy = shown[t.user_attrs["experiment"]]
        assert params["epochs"] == t.params["train.epochs"]
        assert params["learning_rate"] == t.params["train.learning_rate"]
        assert accuracy == t.user_attrs["test_accuracy"]


def test_a_study_in_postgresql_is_seen_by_another_worker(postgres):
    search = tune.Search.model_validate({**TINY, "study": "shared"})
    mine = tune.make_study(tune.open_storage(postgres, 1), search, worker=1)
    mine.add_trial(optuna.trial.create_trial(value=0.5, params={}, distributions={}))
    theirs = tune.make_study(tune.open_storage(postgres, 1), search, worker=2)
    assert [t.value for t in theirs.trials] == [0.5]
    other = tune.Search.model_validate(
        {**TINY, "study": "shared", "objective": {"metric": "eval/loss", "direction": "minimize"}}
    )
    with pytest.raises(tune.PipelineError) as e:
        tune.make_study(tune.open_storage(postgres, 1), other, worker=1)
    assert (
        str(e.value)
        == "study 'shared' in this database was made to maximize, not minimize; name a new study"
    )
