"""tools/tune: the search file's checks, the trial table, and real searches on the tiny
pipeline, each trial a `dvc exp run`: resumed from SQLite, pruned, interrupted, a worker
killed, and two workers on one study in a real PostgreSQL server (started here on
127.0.0.1 from Debian's `postgresql` package, as an unprivileged user, and stopped)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import yaml

from tests.conftest import (
    HAVE_MNIST,
    ROOT,
    copy_project,
    copy_reproduced,
    run,
    sh,
    shown_experiments,
    user_env,
)
from tests.test_remote import clone, free_port, machine_a, s3  # noqa: F401 (fixtures)
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
        ({"space": {"train.lr": {"low": 0.1, "high": 1.0}}},
         "space.train.lr: not a key of params.yaml"),
        ({"space": {"train.learning_rate": {"low": 0.1, "high": 0.01}}},
         "space.train.learning_rate: low must be below high, got low=0.1, high=0.01"),
        ({"space": {"train.learning_rate": {"low": 0, "high": 0.1, "log": True}}},
         "space.train.learning_rate: a log scale needs low > 0, got low=0"),
        ({"space": {"train.batch_size": {"choices": []}}}, "space.train.batch_size: choices is empty"),
        ({"space": {"train.epochs": {"low": 1, "high": 3, "choices": [1]}}},
         "space.train.epochs: give either choices or low and high, not both"),
        ({"space": {"train.epochs": {"low": 1, "hihg": 3}}}, "space.train.epochs.hihg: unknown key"),
        ({"fixed": {"train.epochs": 2}}, "space.train.epochs: also in fixed; give it in one of the two"),
        ({"stage": "trian"}, "stage: no stage 'trian' in dvc.yaml"),
        ({"budget": {"trials": 0, "minutes": None}},
         "budget.trials: Input should be greater than or equal to 1, got 0"),
        ({"objective": {"metric": "eval/accuracy", "direction": "up"}},
         "objective.direction: Input should be 'maximize' or 'minimize', got 'up'"),
    ],
)  # fmt: skip
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
        1, f"Error: {space}: not valid YAML at line 2: expected ',' or ']', but got '}}'\n"
    )  # fmt: skip


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


def test_history_is_read_in_whole_lines_and_never_from_an_older_file(tmp_path):
    tsv = tmp_path / "accuracy.tsv"
    tsv.write_text("step\taccuracy\n1\t0.5\n2\t0.75\n3\t0.8")  # epoch 3 is being written
    assert tune.read_history(tsv) == [(1, 0.5), (2, 0.75)]
    assert tune.read_history(tsv, since=tsv.stat().st_mtime + 1) == []
    assert tune.read_history(tmp_path / "none.tsv") == []


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
    dist = {"train.epochs": optuna.distributions.IntDistribution(1, 2),
            "train.learning_rate": optuna.distributions.FloatDistribution(0.001, 0.05, log=True)}  # fmt: skip
    State = optuna.trial.TrialState

    def add(state, value, fit, epochs, lr, steps=None):
        attrs = {"experiment": f"tiny-{len(study.trials)}", "fit_s": fit, "epochs": epochs,
                 "test_accuracy": None if value is None else value - 0.01}  # fmt: skip
        study.add_trial(optuna.trial.create_trial(
            state=state, value=value, params={"train.epochs": epochs, "train.learning_rate": lr},
            distributions=dist, user_attrs=attrs, intermediate_values=steps or {}))  # fmt: skip

    add(State.COMPLETE, 0.9, 4.0, 2, 0.01)
    add(State.PRUNED, None, None, 1, 0.002, {1: 0.4})
    add(State.COMPLETE, 0.95, 6.5, 2, 0.02)  # better, but over max_fit_s
    add(State.COMPLETE, 0.92, 3.0, 1, 0.03)
    add(State.FAIL, None, None, 2, 0.004)
    assert tune.trial_table(study, search).splitlines() == [
        "| trial | state | eval/accuracy (validation) | test accuracy | fit s | epochs | train.epochs | train.learning_rate | experiment |",
        "|---|---|---|---|---|---|---|---|---|",
        "| 3 | complete | 0.9200 | 0.9100 | 3.00 | 1 | 1 | 0.0300 | tiny-3 |",
        "| 0 | complete | 0.9000 | 0.8900 | 4.00 | 2 | 2 | 0.0100 | tiny-0 |",
        "| 2 | complete, over 5 s | 0.9500 | 0.9400 | 6.50 | 2 | 2 | 0.0200 | tiny-2 |",
        "| 1 | pruned at epoch 1 | 0.4000 |  |  | 1 | 1 | 0.0020 |  |",
        "| 4 | fail |  |  |  | 2 | 2 | 0.0040 |  |",
    ]  # fmt: skip
    assert tune.best_trial(study, search).number == 3


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
    before = exp_run_entries(repo)
    space = space_file(tmp_path / "s.yaml", pruner=pruning, budget={"trials": 1, "minutes": None},
                       space={**TINY["space"], "train.epochs": {"low": 100, "high": 200}})  # fmt: skip
    sh(repo, *tune_cmd(space, out))
    (pruned,) = load(url).trials
    assert pruned.state == optuna.trial.TrialState.PRUNED
    assert list(pruned.intermediate_values) == [1]
    assert exp_refs(repo) == [] and exp_run_entries(repo) == before
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
        f"failed to run: python -m stages.train --data data/prepared --model data/model/model.keras "
        f"--live data/train --checkpoint data/checkpoint, exited with 1 (log: {log})"
    ]
    assert (
        "Error: params.yaml: train.epochs must be an integer >= 1 or preset, got 0"
        in log.read_text()
    )
    (failed,) = load(f"sqlite:///{out / 'tiny.db'}").trials
    assert (failed.state.name, failed.params["train.epochs"]) == ("FAIL", 0)
    assert failed.user_attrs["experiment"] == "tiny-0"
    assert not (out / "trials.md").exists()
    # No experiment. DVC keeps its record of the failed run (refs/exps/exec/EXEC_HEAD and
    # .dvc/tmp/exps/run/<id>), as after a failed `dvc exp run` typed by hand.
    assert experiments(repo) == []
    assert len(set(exp_run_entries(repo)) - set(before)) == 1
    assert_as_committed(repo)


def start_tune(repo, space, out, *flags):
    log = (Path(out).parent / f"{Path(out).name}.log").open("w")
    return subprocess.Popen(tune_cmd(space, out, *flags), cwd=repo, env=user_env(),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip


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
    before = exp_run_entries(repo)
    proc = start_tune(repo, space, out)
    wait_for_train(out, "tiny-0")
    os.kill(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the tune process
    assert proc.wait(60) == 130
    last = Path(f"{out}.log").read_text().strip().splitlines()[-1]
    assert last == ("Interrupted: the running trial is marked failed and its outputs are gone; "
                    "rerun the same command to resume 'tiny'")  # fmt: skip
    assert [t.state.name for t in load(f"sqlite:///{out / 'tiny.db'}").trials] == ["FAIL"]
    assert exp_refs(repo) == [] and exp_run_entries(repo) == before
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
    pg(PG_BIN / "pg_ctl", "-D", data, "-l", home / "server.log", "-w", "start",
       "-o", f"-h 127.0.0.1 -p {port} -k {home}")  # fmt: skip
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
        proc = start_tune(repo, space, tmp_path / f"out{k}", "--storage", postgres,
                          "--worker", str(k), "--push", "origin")  # fmt: skip
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
    other = tune.Search.model_validate({**TINY, "study": "shared",
                                        "objective": {"metric": "eval/loss", "direction": "minimize"}})  # fmt: skip
    with pytest.raises(tune.PipelineError) as e:
        tune.make_study(tune.open_storage(postgres, 1), other, worker=1)
    assert (
        str(e.value)
        == "study 'shared' in this database was made to maximize, not minimize; name a new study"
    )
