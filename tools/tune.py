"""Hyperparameter search in which every trial is a DVC experiment: Optuna proposes, and
`dvc exp run` trains and evaluates.

Reads   the search file (default tools/tune.yaml): space (params.yaml keys), objective (a
        per-epoch metric of the train stage, on the validation split), budget, pruner;
        dvc.yaml's vars for the paths; each trial's log for `train: fit took N s`.
Writes  one experiment per finished trial, named <study>-<number> (`dvc exp show` lists it,
        `dvc exp apply` restores it, --push REMOTE shares it); the Optuna study in --storage
        (default: SQLite at OUT/<study>.db, so a rerun resumes); OUT/trials.md, the trials
        sorted by the objective; OUT/*.png, Optuna's figures; OUT/logs/<experiment>.log.

Several machines work on one study through one database URL (postgresql://...), each in
its own clone, each with its own --worker number. The workspace is left as it was found:
a pruned or interrupted trial is stopped and its half-made outputs are put back.
"""

import argparse
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from stages.common import PipelineError, atomic_file
from tools.paths import dvc_var

FIT_LINE = re.compile(r"^train: fit took ([0-9.]+) s", re.M)
POLL_S = 0.5  # how often a running trial's history is read
STOP_WAIT_S = 30  # after Ctrl-C, DVC gets this long to stop its stage before SIGKILL
Scalar = str | int | float | bool | None


class Dimension(BaseModel):
    """One params.yaml key: low..high (both integers: an integer dimension) or choices."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    low: int | float | None = None
    high: int | float | None = None
    log: bool = False  # sample log(value) uniformly: for rates spanning decades
    step: int | float | None = None
    choices: list[Scalar] | None = None

    @model_validator(mode="after")
    def check(self):
        if self.choices is not None:
            if (self.low, self.high, self.step) != (None, None, None) or self.log:
                raise ValueError("give either choices or low and high, not both")
            if not self.choices:
                raise ValueError("choices is empty")
            return self
        if self.low is None or self.high is None:
            raise ValueError("needs low and high, or choices")
        if not self.low < self.high:
            raise ValueError(f"low must be below high, got low={self.low}, high={self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log scale needs low > 0, got low={self.low}")
        if self.log and self.step is not None:
            raise ValueError("log and step cannot be combined")
        return self

    def is_int(self):
        return all(isinstance(v, int) for v in (self.low, self.high, self.step or 1))


class Objective(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    metric: str = Field(pattern=r"^[\w.-]+(/[\w.-]+)*$")  # dvclive name: eval/accuracy
    direction: Literal["maximize", "minimize"]


class Budget(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    trials: int = Field(ge=1)  # complete + pruned, all workers together
    minutes: float | None = Field(gt=0)  # per worker; None: no limit


class Pruner(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["median", "threshold", "none"]
    startup_trials: int = Field(0, ge=0)
    warmup_epochs: int = Field(0, ge=0)
    lower: float | None = None  # threshold only
    upper: float | None = None

    @model_validator(mode="after")
    def check(self):
        if self.kind == "threshold" and self.lower is None and self.upper is None:
            raise ValueError("kind threshold needs lower or upper")
        return self


class Search(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    # A git ref name component, since experiment names are git refs.
    study: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    stage: str
    seed: int = Field(ge=0)
    objective: Objective
    max_fit_s: float | None = Field(gt=0)
    budget: Budget
    pruner: Pruner
    heartbeat_s: int = Field(ge=1)
    fixed: dict[str, Scalar] = {}
    space: dict[str, Dimension] = Field(min_length=1)


class Surplus(Exception):
    """Another worker took the study's last trial at the same moment as this one."""


# --- the search file ----------------------------------------------------------------------


def flat_keys(doc, prefix=""):
    """The dotted keys of a params file: {"train.epochs", "train.seed", ...}."""
    keys = set()
    for key, value in doc.items():
        keys.add(f"{prefix}{key}")
        if isinstance(value, dict):
            keys |= flat_keys(value, f"{prefix}{key}.")
    return keys


def one_line(error):
    """The first problem of a pydantic ValidationError, as `where: what`."""
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "(top level)"
    what = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        what = "unknown key"
    elif first["type"] == "missing":
        what = "missing"
    elif "input" in first and first["type"] not in ("value_error",):
        what = f"{what}, got {first['input']!r}"
    return f"{where}: {what}"


def load_search(path, params_file="params.yaml", dvc_yaml="dvc.yaml"):
    """Reads and checks the search file against params.yaml and dvc.yaml; returns a Search."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path} not found") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise PipelineError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if not isinstance(doc, dict):
        raise PipelineError(f"{path}: expected a mapping of settings, got {type(doc).__name__}")
    try:
        search = Search.model_validate(doc)
    except ValidationError as e:
        raise PipelineError(f"{path}: {one_line(e)}") from None
    params = flat_keys(yaml.safe_load(Path(params_file).read_text()) or {})
    for section in ("fixed", "space"):
        for key in getattr(search, section):
            if key not in params:
                raise PipelineError(f"{path}: {section}.{key}: not a key of {params_file}")
    both = sorted(set(search.fixed) & set(search.space))
    if both:
        raise PipelineError(f"{path}: space.{both[0]}: also in fixed; give it in one of the two")
    stages = (yaml.safe_load(Path(dvc_yaml).read_text()) or {}).get("stages", {})
    if search.stage not in stages:
        raise PipelineError(f"{path}: stage: no stage {search.stage!r} in {dvc_yaml}")
    return search


# --- storage ------------------------------------------------------------------------------


def shown_url(url):
    """The URL without its password, for messages."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def open_storage(url, heartbeat_s):
    """Optuna's relational storage at `url`, with heartbeats: a trial whose worker died is
    marked failed after 3 silent heartbeats, and retried once with the same values."""
    import optuna
    import sqlalchemy.exc

    # Heartbeats and their retry callback are "experimental" since Optuna 2.8: used as documented.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except sqlalchemy.exc.ArgumentError:
        raise PipelineError(f"--storage: not a database URL: {url!r}") from None
    engine_url = url
    if parsed.drivername == "postgresql":
        # SQLAlchemy 2.1 picks psycopg 3 for a bare postgresql://; the lock files pin
        # psycopg2-binary (self-contained wheels), so name its driver.
        engine_url = parsed.set(drivername="postgresql+psycopg2").render_as_string(
            hide_password=False
        )
    engine = {}
    if url.startswith("sqlite:"):
        # Workers on one machine may share the file: wait for its lock instead of failing.
        engine = {"connect_args": {"timeout": 60}}
    try:
        return optuna.storages.RDBStorage(
            engine_url,
            engine_kwargs=engine,
            heartbeat_interval=heartbeat_s,
            grace_period=3 * heartbeat_s,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
        )
    except ImportError as e:
        raise PipelineError(f"--storage: no driver for {shown_url(url)}: {e}") from None
    except sqlalchemy.exc.NoSuchModuleError as e:
        raise PipelineError(f"--storage: unknown database kind in {shown_url(url)}: {e}") from None
    except sqlalchemy.exc.OperationalError as e:
        reason = str(e.orig).strip().splitlines()[0]
        raise PipelineError(f"cannot reach the study database {shown_url(url)}: {reason}") from None


# --- the workspace ------------------------------------------------------------------------


def git_bytes(*args):
    return subprocess.run(["git", *args], capture_output=True, check=True).stdout


def snapshot():
    """{path: bytes, or None if deleted} of the git-tracked files that differ from HEAD:
    params.yaml and dvc.lock after an experiment, metrics kept in git, a user's edits."""
    names = git_bytes("diff", "--name-only", "-z", "HEAD").decode().split("\0")
    return {n: (Path(n).read_bytes() if Path(n).exists() else None) for n in names if n}


def restore(saved, scratch):
    """Puts the git-tracked files back as in `saved` (a snapshot; HEAD's for the others),
    unstaged (a `dvc exp run` killed midway leaves its changes in git's index), removes
    `scratch` (train's resume directory) and checks DVC's outputs out to match."""
    names = set(snapshot()) | set(saved)
    staged = git_bytes("diff", "--cached", "--name-only", "-z").decode().split("\0")
    if any(staged):
        git_bytes("reset", "-q", "--", *filter(None, staged))
    for name in names:
        content = saved[name] if name in saved else git_bytes("show", f"HEAD:{name}")
        path = Path(name)
        if content is None:
            path.unlink(missing_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
    shutil.rmtree(scratch, ignore_errors=True)
    # --allow-missing: outputs that were not in the cache when the search began (a clone
    # that never pulled) were not in the workspace either.
    subprocess.run(["dvc", "checkout", "--force", "--quiet", "--allow-missing"], check=True)


EXPS_TMP = Path(".dvc/tmp/exps")


def dvc_run_state():
    """What `dvc exp run` writes: refs/exps/* (its exec refs while it runs, the
    experiment's own ref when it finishes) and the entries of .dvc/tmp/exps/{run,cache}.
    A run stopped midway leaves them half-made; one stopped as it finished, its ref."""
    refs = git_bytes("for-each-ref", "--format=%(refname) %(objectname)", "refs/exps")
    entries = {p for sub in ("run", "cache") for p in (EXPS_TMP / sub).glob("*")}
    return dict(line.split() for line in refs.decode().splitlines()), entries


def undo_dvc_run(before):
    """Puts DVC's experiment bookkeeping back as it was before a stopped run: a pruned or
    interrupted trial leaves no experiment, even one DVC saved as the stop arrived."""
    refs, entries = before
    now_refs, now_entries = dvc_run_state()
    for ref, sha in now_refs.items():
        if ref not in refs:
            git_bytes("update-ref", "-d", ref)
        elif refs[ref] != sha:
            git_bytes("update-ref", ref, refs[ref])
    for path in now_entries - entries:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def stop(proc):
    """Stops a running `dvc exp run` (its own process group) as Ctrl-C would, then kills
    whatever of it is left."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the stage's python, if DVC left it behind
    except ProcessLookupError:
        pass
    proc.wait()


# --- one trial ------------------------------------------------------------------------------


def experiment_name(study, number):
    return f"{study}-{number}"


def suggest(trial, key, dim):
    if dim.choices is not None:
        return trial.suggest_categorical(key, dim.choices)
    if dim.is_int():
        return trial.suggest_int(key, dim.low, dim.high, step=dim.step or 1, log=dim.log)
    return trial.suggest_float(key, dim.low, dim.high, step=dim.step, log=dim.log)


def set_flags(overrides):
    """-S key=value for each override, in YAML's spelling (null, true, 0.001)."""
    flags = []
    for key, value in overrides.items():
        text = yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()
        flags += ["-S", f"{key}={text}"]
    return flags


def read_history(tsv, since=None):
    """[(step, value)] of a dvclive .tsv: whole lines only, as it may be mid-write; none
    when the file is older than `since` (the previous trial's, not yet deleted)."""
    try:
        if since is not None and tsv.stat().st_mtime < since:
            return []
        text = tsv.read_text()
    except FileNotFoundError:
        return []
    lines = text.split("\n")[1:-1]  # the header; the last piece is empty or unfinished
    rows = []
    for line in lines:
        step, value = line.split("\t")[:2]
        rows.append((int(step), float(value)))
    return rows


def fit_seconds(log_text):
    """The train stage's `train: fit took N s`; None when train did not run (the run cache
    restored it)."""
    found = FIT_LINE.findall(log_text)
    return float(found[-1]) if found else None


def watch(proc, trial, tsv, since):
    """Reports each new epoch of the running trial to Optuna; raises TrialPruned when the
    pruner says so. Returns dvc's exit code."""
    import optuna

    reported = 0
    while True:
        done = proc.poll() is not None
        rows = read_history(tsv, since)
        for step, value in rows[reported:]:
            trial.report(value, step)
            if not done and trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {step}: {value:.4f}")
        reported = max(reported, len(rows))
        if done:
            return proc.returncode
        time.sleep(POLL_S)


class Runner:
    """Runs trials as `dvc exp run` in this workspace."""

    def __init__(self, search, out, live, evaluation, scratch):
        self.search = search
        self.logs = Path(out) / "logs"
        self.history = Path(live) / "plots" / "metrics" / f"{search.objective.metric}.tsv"
        self.test_metrics = Path(evaluation) / "metrics.json"
        self.scratch = scratch

    def overrides(self, trial):
        space = {k: suggest(trial, k, d) for k, d in self.search.space.items()}
        return {**self.search.fixed, **space}

    def __call__(self, trial):
        import json

        check_budget(trial, self.search.budget.trials)
        name = experiment_name(self.search.study, trial.number)
        overrides = self.overrides(trial)
        trial.set_user_attr("experiment", name)
        trial.set_user_attr("overrides", overrides)
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"{name}.log"
        cmd = ["dvc", "exp", "run", "--name", name, *set_flags(overrides), self.search.stage]
        before, bookkeeping = snapshot(), dvc_run_state()
        started = time.time()
        with log.open("w") as out:
            # Its own session: a terminal's Ctrl-C reaches only us, and we stop it cleanly.
            # Unbuffered: the stages' lines reach the log as they are printed.
            proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
            try:
                code = watch(proc, trial, self.history, started)
            except BaseException:  # pruned, Ctrl-C, a lost database: never leave it running
                stop(proc)
                undo_dvc_run(bookkeeping)
                restore(before, self.scratch)
                raise
        text = log.read_text()
        if code != 0:
            last = [line for line in text.splitlines() if line.strip()][-1:] or ["(no output)"]
            raise PipelineError(
                f"trial {trial.number}: `dvc exp run` exited {code}: {last[0]} (log: {log})"
            )
        rows = read_history(self.history)
        if not rows:
            raise PipelineError(f"trial {trial.number}: no {self.history} after the run")
        fit = fit_seconds(text)
        trial.set_user_attr("epochs", rows[-1][0])
        trial.set_user_attr("fit_s", fit)
        if self.search.max_fit_s is not None and fit is not None:
            trial.set_constraint("fit_s", fit - self.search.max_fit_s)  # <= 0: feasible
        test = json.loads(self.test_metrics.read_text()) if self.test_metrics.exists() else {}
        trial.set_user_attr("test_accuracy", test.get("accuracy"))
        return rows[-1][1]


def check_budget(trial, trials):
    """Raises Surplus when the trials numbered before this one already fill the budget:
    two workers asked for the last trial at once."""
    import optuna

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
              optuna.trial.TrialState.RUNNING)  # fmt: skip
    earlier = trial.study.get_trials(deepcopy=False, states=states)
    if sum(t.number < trial.number for t in earlier) >= trials:
        trial.set_user_attr("note", "surplus: another worker took the last trial")
        raise Surplus()


# --- the study ------------------------------------------------------------------------------


def finished(study):
    import optuna

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return len(study.get_trials(deepcopy=False, states=states))


def running(study):
    import optuna

    return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)))


def feasible(trial, max_fit_s):
    fit = trial.user_attrs.get("fit_s")
    return max_fit_s is None or fit is None or fit <= max_fit_s


def best_trial(study, search, within=True):
    """The best complete trial (within max_fit_s unless `within` is false), or None."""
    import optuna

    done = [
        t
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if not within or feasible(t, search.max_fit_s)
    ]
    if not done:
        return None
    sign = 1 if search.objective.direction == "maximize" else -1
    return max(done, key=lambda t: (sign * t.value, -(t.user_attrs.get("fit_s") or 0)))


def make_study(storage, search, worker):
    import optuna

    # Optuna logs a failed trial as two warnings, one with the traceback; the command
    # reports it once, as `Error: trial N: ...`.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    p = search.pruner
    if p.kind == "median":
        # Optuna prunes from step n_warmup_steps on; epochs (steps) count from 1.
        pruner = optuna.pruners.MedianPruner(
            n_startup_trials=p.startup_trials, n_warmup_steps=p.warmup_epochs + 1
        )
    elif p.kind == "threshold":
        pruner = optuna.pruners.ThresholdPruner(
            lower=p.lower, upper=p.upper, n_warmup_steps=p.warmup_epochs + 1
        )
    else:
        pruner = optuna.pruners.NopPruner()
    study = optuna.create_study(
        storage=storage,
        study_name=search.study,
        direction=search.objective.direction,
        pruner=pruner,
        load_if_exists=True,
    )
    if study.direction.name.lower() != search.objective.direction:
        raise PipelineError(
            f"study {search.study!r} in this database was made to {study.direction.name.lower()}, "
            f"not {search.objective.direction}; name a new study"
        )
    # Seeded, and different for each worker and each resumption, so that two workers (or a
    # rerun) never replay the same random start-up trials.
    seed = search.seed + 1000 * (worker - 1) + len(study.trials)
    study.sampler = optuna.samplers.TPESampler(seed=seed)
    return study


def progress_text(study, search):
    best = best_trial(study, search)
    if best is None:
        return "best: none yet"
    return f"best: trial {best.number}, {best.value:.4f}"


def run_search(study, search, runner, push):
    """Runs trials until the study holds budget.trials finished ones, or this worker's time
    is up. Stops at a failed trial (a broken pipeline, not noise)."""
    import optuna
    from tqdm import tqdm

    trials = search.budget.trials
    deadline = math.inf
    if search.budget.minutes is not None:
        deadline = time.monotonic() + 60 * search.budget.minutes
    bar = tqdm(total=trials, initial=min(finished(study), trials), desc=search.study,
               unit="trial", file=sys.stderr, dynamic_ncols=True)  # fmt: skip
    bar.set_postfix_str(progress_text(study, search))
    try:
        while finished(study) < trials and time.monotonic() < deadline:
            if finished(study) + running(study) >= trials:
                # Other workers hold the last trials: wait for them, as one may die and
                # leave its trial to be retried (fail_stale_trials marks and re-enqueues it).
                time.sleep(search.heartbeat_s)
                optuna.storages.fail_stale_trials(study)
                continue
            # One trial per call: Optuna fails stale trials (dead workers), asks, beats the
            # heartbeat while the trial runs and records how it ended.
            study.optimize(runner, n_trials=1, catch=(Surplus,))
            if push:
                push_finished(study, push)
            bar.n = min(finished(study), trials)
            bar.set_postfix_str(progress_text(study, search))
            bar.refresh()
    finally:
        bar.close()


PUSHED = set()


def push_finished(study, remote):
    """Pushes each complete trial's experiment that this clone holds and has not pushed."""
    import optuna

    local = set(git_bytes("for-each-ref", "--format=%(refname)", "refs/exps").decode().split())
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        name = t.user_attrs.get("experiment")
        if name in PUSHED or not any(ref.endswith(f"/{name}") for ref in local):
            continue
        result = subprocess.run(
            ["dvc", "exp", "push", remote, name], capture_output=True, text=True
        )
        if result.returncode != 0:
            why = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
            raise PipelineError(
                f"experiment {name} is complete but `dvc exp push {remote} {name}` failed: {why[0]}"
            )
        PUSHED.add(name)


# --- results ----------------------------------------------------------------------------------

STATE_ORDER = {"COMPLETE": 0, "PRUNED": 1, "RUNNING": 2, "WAITING": 3, "FAIL": 4}


def last_value(t):
    if t.value is not None:
        return t.value
    if t.intermediate_values:
        return t.intermediate_values[max(t.intermediate_values)]
    return None


def sorted_trials(study, search):
    """Complete trials first (best first, infeasible after feasible), then pruned ones by
    their last epoch's value, then the rest."""
    sign = -1 if search.objective.direction == "maximize" else 1

    def key(t):
        value = last_value(t)
        return (
            STATE_ORDER.get(t.state.name, 5),
            not feasible(t, search.max_fit_s),
            math.inf if value is None else sign * value,
            t.number,
        )

    return sorted(study.trials, key=key)


def cell(value, digits=4):
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-3 else f"{value:.{digits}f}"
    return str(value)


def trial_table(study, search):
    """The trials as a Markdown table, sorted by the objective."""
    keys = list(search.space)
    metric = search.objective.metric
    head = ["trial", "state", f"{metric} (validation)", "test accuracy", "fit s", "epochs"]
    head += keys + ["experiment"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in sorted_trials(study, search):
        state = t.state.name.lower()
        if t.state.name == "COMPLETE" and not feasible(t, search.max_fit_s):
            state = f"complete, over {search.max_fit_s:g} s"
        if t.state.name == "PRUNED" and t.intermediate_values:
            state = f"pruned at epoch {max(t.intermediate_values)}"
        epochs = t.user_attrs.get("epochs")
        fit = t.user_attrs.get("fit_s")
        row = [
            str(t.number),
            state,
            cell(last_value(t)),
            cell(t.user_attrs.get("test_accuracy")),
            "" if fit is None else f"{fit:.2f}",
            "" if epochs is None else str(epochs),
            *(cell(t.params.get(k)) for k in keys),
            t.user_attrs.get("experiment", "") if t.state.name == "COMPLETE" else "",
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def save_figure(ax, path):
    with atomic_file(path) as tmp:
        ax.figure.savefig(tmp, dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(ax.figure)


def write_figures(study, out):
    """Optuna's optimisation history, parameter importances and slice plot as PNGs;
    returns the files written (none before two trials have completed)."""
    import matplotlib
    import optuna

    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as plots

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < 2:
        return []
    import numpy as np
    from matplotlib.ticker import NullFormatter

    written = []
    for name, plot in (
        ("history", plots.plot_optimization_history),
        ("importances", plots.plot_param_importances),
        ("slice", plots.plot_slice),
    ):
        axes = np.atleast_1d(plot(study))  # the slice plot: one Axes per parameter
        for ax in axes:
            if ax.get_xscale() == "log":  # minor labels (2x10^-3, ...) overlap at this size
                ax.xaxis.set_minor_formatter(NullFormatter())
        path = Path(out) / f"{name}.png"
        save_figure(axes[0], path)
        written.append(path)
    return written


def report(study, search, out):
    """Writes OUT/trials.md and the figures; prints the table and the best trial."""
    table = trial_table(study, search)
    with atomic_file(Path(out) / "trials.md") as tmp:
        tmp.write_text(table)
    figures = write_figures(study, out)
    states = [t.state.name for t in study.trials]
    print(table)
    counts = ", ".join(f"{states.count(s)} {s.lower()}" for s in STATE_ORDER if s in states)
    print(f"{search.study}: {len(states)} trials ({counts})")
    best = best_trial(study, search)
    if best is None:
        best = best_trial(study, search, within=False)
        if best is None:
            print("No complete trial yet.")
            return
        print(f"No complete trial fit within max_fit_s = {search.max_fit_s:g} s; the best of all:")
    fit = best.user_attrs.get("fit_s")
    fit_text = "" if fit is None else f", fit {fit:.2f} s"
    print(
        f"Best: trial {best.number}, {search.objective.metric} {best.value:.4f} (validation){fit_text}"
    )
    print(f"Its test accuracy: {cell(best.user_attrs.get('test_accuracy'))}")
    print(f"Restore it:   dvc exp apply {best.user_attrs['experiment']}")
    print(f"Reproduce it: dvc exp run {' '.join(set_flags(best.user_attrs['overrides']))}")
    print(f"Table and figures: {Path(out) / 'trials.md'} {' '.join(map(str, figures))}")


# --- the command --------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default="tools/tune.yaml", help="the search file")
    parser.add_argument("--storage", help="database URL (default: sqlite:///OUT/<study>.db)")
    parser.add_argument("--out", default="tune", help="table, figures and trial logs")
    parser.add_argument("--worker", type=int, default=1, help="this worker's number, 1..N")
    parser.add_argument(
        "--push", metavar="REMOTE", help="dvc exp push each trial to this git remote"
    )
    args = parser.parse_args(argv)
    # Ctrl-C or `kill -INT` stops the search cleanly, also when it was started from a
    # script's background job, which inherits SIGINT ignored (so would every trial's DVC).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if args.worker < 1:
        raise PipelineError(f"--worker must be >= 1, got {args.worker}")
    search = load_search(args.space)
    out = Path(args.out)
    url = args.storage or f"sqlite:///{out / (search.study + '.db')}"
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    study = make_study(open_storage(url, search.heartbeat_s), search, args.worker)
    scratch = Path(dvc_var("checkpoint"))
    runner = Runner(search, out, dvc_var("live"), dvc_var("evaluation"), scratch)
    initial = snapshot()
    try:
        run_search(study, search, runner, args.push)
    except KeyboardInterrupt:
        restore(initial, scratch)
        print(
            f"Interrupted: the running trial is marked failed and its outputs are gone; "
            f"rerun the same command to resume {search.study!r}",
            file=sys.stderr,
        )
        return 130
    except BaseException:
        restore(initial, scratch)
        raise
    restore(initial, scratch)
    report(study, search, out)
    return 0


if __name__ == "__main__":
    try:
        code = main()
    except PipelineError as e:
        print(f"Error: {e}", file=sys.stderr)
        code = 1
    sys.exit(code)
