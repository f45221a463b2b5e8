"""Hyperparameter search in which every trial is a DVC experiment: Optuna proposes, and
`dvc exp run --temp` trains in a temporary copy of the workspace, never in it (docs/tune.md)."""

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Literal

import yaml
from pandas import json_normalize
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from stages.common import PipelineError, atomic_file, run_cli
from stages.params import explain
from tools.paths import dvc_var

FIT_LINE = re.compile(r"^train: fit took ([0-9.]+) s", re.M)
POLL_S = 0.5  # how often a running trial's history is read
# Where `dvc exp run --temp` makes its copies (mkdtemp): not a public API; launch() only.
COPIES = Path(".dvc/tmp/exps/standalone")
# DVC's temp queue runs the first entry stashed, whoever stashed it: start runs one at a time.
LAUNCH = threading.Lock()
STOP = threading.Event()  # Ctrl-C: running trials stop, no new one starts
STATES = ("COMPLETE", "PRUNED", "RUNNING", "WAITING", "FAIL")  # the table's order
Scalar = str | int | float | bool | None


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Dimension(Frozen):
    """One params.yaml key: low..high (both integers: an integer dimension) or choices."""

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
        elif self.low is None or self.high is None:
            raise ValueError("needs low and high, or choices")
        elif not self.low < self.high:
            raise ValueError(f"low must be below high, got low={self.low}, high={self.high}")
        elif self.log and self.low <= 0:
            raise ValueError(f"a log scale needs low > 0, got low={self.low}")
        elif self.log and self.step is not None:
            raise ValueError("log and step cannot be combined")
        return self

    def suggest(self, trial, key):
        if self.choices is not None:
            return trial.suggest_categorical(key, self.choices)
        if all(isinstance(v, int) for v in (self.low, self.high, self.step or 1)):
            return trial.suggest_int(key, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(key, self.low, self.high, step=self.step, log=self.log)


class Objective(Frozen):
    metric: Literal["eval/accuracy", "eval/loss", "train/accuracy", "train/loss"]  # dvclive's
    direction: Literal["maximize", "minimize"]


class Budget(Frozen):
    trials: int = Field(ge=1)  # complete + pruned, all workers together
    minutes: float | None = Field(gt=0)  # per worker; None: no limit


class Pruner(Frozen):
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


class Search(Frozen):
    study: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # experiment names are git refs
    stage: str
    seed: int = Field(ge=0)
    objective: Objective
    max_fit_s: float | None = Field(gt=0)
    budget: Budget
    pruner: Pruner
    heartbeat_s: int = Field(ge=1)
    fixed: dict[str, Scalar] = {}
    space: dict[str, Dimension] = Field(min_length=1)


def load_search(path, params_file="params.yaml", dvc_yaml="dvc.yaml"):
    """Reads and checks the search file against params.yaml and dvc.yaml; returns a Search."""
    try:
        search = Search.model_validate(doc := yaml.safe_load(Path(path).read_text()))
    except FileNotFoundError:
        raise PipelineError(f"{path} not found") from None
    except yaml.YAMLError as e:
        where = f" at line {e.problem_mark.line + 1}" if getattr(e, "problem_mark", None) else ""
        raise PipelineError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    except ValidationError as e:
        raise PipelineError(f"{path}: {explain(e, Search, values=doc)}") from None
    keys = set(json_normalize(yaml.safe_load(Path(params_file).read_text())).columns)
    unknown = [f"{s}.{k}" for s in ("fixed", "space") for k in getattr(search, s) if k not in keys]
    if unknown:
        raise PipelineError(f"{path}: {unknown[0]}: not a key of {params_file}")
    if both := sorted(set(search.fixed) & set(search.space)):
        raise PipelineError(f"{path}: space.{both[0]}: also in fixed; give it in one of the two")
    if search.stage not in yaml.safe_load(Path(dvc_yaml).read_text())["stages"]:
        raise PipelineError(f"{path}: stage: no stage {search.stage!r} in {dvc_yaml}")
    return search


def open_storage(url, heartbeat_s):
    """Optuna's storage at `url`; a trial silent for 3 heartbeats fails and is retried once."""
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    # RetryHeartbeatStaleTrialCallback is "experimental" in Optuna: used as documented.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    shown = re.sub(r":[^:/@]*@", ":***@", url)  # never print the password
    if url.startswith("postgresql://"):  # SQLAlchemy's default is psycopg 3; the locks pin 2
        url = url.replace("postgresql://", "postgresql+psycopg2://", 1)
    # Workers on one machine may share a SQLite file: wait for its lock instead of failing.
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite:") else {}
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)
    try:
        return optuna.storages.RDBStorage(url, engine, heartbeat_interval=heartbeat_s,
            grace_period=3 * heartbeat_s, heartbeat_stale_trial_callback=retry)  # fmt: skip
    except (ImportError, SQLAlchemyError) as e:
        reason = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
        raise PipelineError(f"cannot reach the study database {shown}: {reason}") from None


def make_study(storage, search, worker):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a failed trial: our one Error line
    p, warmup = search.pruner, search.pruner.warmup_epochs + 1  # epochs (steps) count from 1
    pruner = (optuna.pruners.MedianPruner(p.startup_trials, warmup) if p.kind == "median" else
              optuna.pruners.ThresholdPruner(p.lower, p.upper, warmup) if p.kind == "threshold"
              else optuna.pruners.NopPruner())  # fmt: skip
    study = optuna.create_study(storage=storage, study_name=search.study, pruner=pruner,
        direction=search.objective.direction, load_if_exists=True)  # fmt: skip
    if (made := study.direction.name.lower()) != search.objective.direction:
        raise PipelineError(f"study {search.study!r} in this database was made to {made}, "
                            f"not {search.objective.direction}; name a new study")  # fmt: skip
    # Different for each worker and each resumption: none replays another's start-up trials.
    seed = search.seed + 1000 * (worker - 1) + len(study.trials)
    study.sampler = optuna.samplers.TPESampler(seed=seed)
    return study


def set_flags(overrides):
    """-S key=value for each override, in YAML's spelling (null, true, 0.001)."""
    flags = []
    for key, value in overrides.items():
        text = yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()
        flags += ["-S", f"{key}={text}"]
    return flags


def epoch_rows(text):
    """[(step, value)] of a dvclive .tsv's text: whole lines only, as it may be mid-write."""
    return [(int(s), float(v)) for s, v, *_ in (r.split("\t") for r in text.split("\n")[1:-1])]


def fit_seconds(log_text):
    """The train stage's `train: fit took N s`; None when the run cache restored train."""
    return float(found[-1]) if (found := FIT_LINE.findall(log_text)) else None


def launch(cmd, log):
    """Starts `dvc exp run --temp` (its own session: Ctrl-C reaches tune alone) and waits for
    its copy: until then DVC stashes the workspace, never to be stopped. -> (process, copy)"""
    with LAUNCH:
        before = set(COPIES.glob("tmp*"))
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # the stages' lines reach the log live
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # fmt: skip
        while proc.poll() is None:
            if copies := set(COPIES.glob("tmp*")) - before:
                return proc, copies.pop()
            time.sleep(POLL_S / 5)
    return proc, None


def watch(proc, trial, tsv, log):
    """Reports each new epoch to Optuna, raises TrialPruned when it says so; -> exit code."""
    import optuna

    reported = 0
    while (code := proc.poll()) is None:
        if STOP.is_set():
            raise KeyboardInterrupt
        try:  # until that line, the copy holds the baseline's history (DVC then removes it)
            text = tsv.read_text() if tsv and "Running stage 'train'" in log.read_text() else ""
        except FileNotFoundError:  # not written yet, or the copy already removed
            text = ""
        for step, value in epoch_rows(text)[reported:]:
            trial.report(value, step)
            reported += 1
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {step}: {value:.4f}")
        STOP.wait(POLL_S)
    return code


def run_trial(trial, search, out):
    """Runs the trial as `dvc exp run --temp`; returns the last epoch's value."""
    import dvc.api

    name = f"{search.study}-{trial.number}"
    overrides = {**search.fixed, **{k: d.suggest(trial, k) for k, d in search.space.items()}}
    trial.set_user_attr("experiment", name)
    trial.set_user_attr("overrides", overrides)
    history = Path(dvc_var("live"), "plots", "metrics", f"{search.objective.metric}.tsv")
    log = Path(out) / "logs" / f"{name}.log"
    cmd = ["dvc", "--wait-for-lock", "exp", "run", "--temp", "--name", name, *set_flags(overrides)]
    with log.open("w") as stdout:
        proc, copy = launch([*cmd, search.stage], stdout)
        try:
            code = watch(proc, trial, copy and copy / history, log)
        except BaseException:  # pruned, Ctrl-C, a lost database: never leave it running
            os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C would: DVC stops, removes the copy
            proc.wait()
            # Removed if DVC saved it as it stopped (else DVC says "not found", ignored).
            subprocess.run([*cmd[:3], "remove", name], capture_output=True, check=False)
            raise
    if code != 0:
        last = [line for line in log.read_text().splitlines() if line.strip()] or ["(no output)"]
        raise PipelineError(f"trial {trial.number}: `dvc exp run` exited {code}: {last[-1]} "
                            f"(log: {log})")  # fmt: skip
    rows = epoch_rows(dvc.api.read(str(history), rev=name))  # the copy is gone
    fit = fit_seconds(log.read_text())
    trial.set_user_attr("epochs", rows[-1][0])
    trial.set_user_attr("fit_s", fit)
    if search.max_fit_s is not None and fit is not None:
        trial.set_constraint("fit_s", fit - search.max_fit_s)  # <= 0: feasible
    test = json.loads(dvc.api.read(str(Path(dvc_var("evaluation"), "metrics.json")), rev=name))
    trial.set_user_attr("test_accuracy", test.get("accuracy"))
    return rows[-1][1]


def feasible(t, max_fit_s):
    return max_fit_s is None or (t.user_attrs.get("fit_s") or 0) <= max_fit_s


def last_value(t):
    values = t.intermediate_values
    return t.value if t.value is not None or not values else values[max(values)]


def ranked(study, search):
    """Complete trials (best first, infeasible last, the faster of equals first), pruned
    ones by their last epoch, the rest. (Optuna's best_trial is never infeasible.)"""
    sign = -1 if search.objective.direction == "maximize" else 1

    def order(t):
        value = float("inf") if last_value(t) is None else sign * last_value(t)
        infeasible = not feasible(t, search.max_fit_s)
        return STATES.index(t.state.name), infeasible, value, t.user_attrs.get("fit_s") or 0

    return sorted(study.trials, key=order)


def cell(value):
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-3 else f"{value:.4f}"
    return "" if value is None else str(value)


def trial_table(study, search):
    """The trials as a Markdown table, ranked."""
    keys = list(search.space)
    head = ["trial", "state", f"{search.objective.metric} (validation)", "test accuracy",
            "fit s", "epochs", *keys, "experiment"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in ranked(study, search):
        attrs, state, done = t.user_attrs, t.state.name.lower(), t.state.name == "COMPLETE"
        if done and not feasible(t, search.max_fit_s):
            state = f"complete, over {search.max_fit_s:g} s"
        if state == "pruned" and t.intermediate_values:
            state = f"pruned at epoch {max(t.intermediate_values)}"
        fit = None if attrs.get("fit_s") is None else f"{attrs['fit_s']:.2f}"
        row = [t.number, state, last_value(t), attrs.get("test_accuracy"), fit, attrs.get("epochs"),
               *(t.params.get(k) for k in keys), attrs["experiment"] if done else None]  # fmt: skip
        lines.append("| " + " | ".join(map(cell, row)) + " |")
    return "\n".join(lines) + "\n"


def report(study, search, out):
    """Writes OUT/trials.md and Optuna's figures; prints the table and the best (first) trial."""
    import matplotlib.pyplot as plt
    import numpy as np
    from optuna.visualization import matplotlib as plots

    table, trials, figures = trial_table(study, search), ranked(study, search), []
    with atomic_file(table_file := Path(out) / "trials.md") as tmp:
        tmp.write_text(table)
    complete = sum(t.state.name == "COMPLETE" for t in trials)  # the figures need two
    for name in ("optimization_history", "param_importances", "slice") if complete > 1 else ():
        axes = np.atleast_1d(getattr(plots, f"plot_{name}")(study))  # slice: one per param
        figures.append(Path(out) / f"{name.split('_')[-1]}.png")
        with atomic_file(figures[-1]) as tmp:
            axes[0].figure.savefig(tmp, dpi=110, bbox_inches="tight")
        plt.close(axes[0].figure)
    states = [t.state.name for t in trials]
    counts = ", ".join(f"{states.count(s)} {s.lower()}" for s in STATES if s in states)
    print(f"{table}\n{search.study}: {len(states)} trials ({counts})")
    if not trials or trials[0].state.name != "COMPLETE":
        print("No complete trial yet.")
        return
    if not feasible(best := trials[0], search.max_fit_s):
        print(f"No complete trial fit within max_fit_s = {search.max_fit_s:g} s; the best of all:")
    fit = best.user_attrs.get("fit_s")
    print(f"Best: trial {best.number}, {search.objective.metric} {best.value:.4f} (validation)"
          f"{'' if fit is None else f', fit {fit:.2f} s'}\n"
          f"Its test accuracy: {cell(best.user_attrs.get('test_accuracy'))}\n"
          f"Restore it:   dvc exp apply {best.user_attrs['experiment']}\n"
          f"Reproduce it: dvc exp run {' '.join(set_flags(best.user_attrs['overrides']))}\n"
          f"Table and figures: {' '.join(map(str, [table_file, *figures]))}")  # fmt: skip


def main(argv=None):
    import optuna

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default="tools/tune.yaml", help="the search file")
    parser.add_argument("--storage", help="database URL (default: sqlite:///OUT/<study>.db)")
    parser.add_argument("--out", default="tune", help="table, figures and trial logs")
    parser.add_argument("--worker", type=int, default=1, help="this worker's number, 1..N")
    parser.add_argument("--jobs", type=int, default=1, help="trials at once on this machine")
    parser.add_argument("--push", metavar="REMOTE", help="dvc exp push each trial to REMOTE")
    args = parser.parse_args(argv)
    if min(args.worker, args.jobs) < 1:
        raise PipelineError(f"--worker and --jobs must be >= 1, got {args.worker}, {args.jobs}")
    search, out = load_search(args.space), Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    url = args.storage or f"sqlite:///{out}/{search.study}.db"
    storage = open_storage(url, search.heartbeat_s)
    # A trial's copy holds git's files; DVC rewrites an untracked .dvc file as it stashes.
    git = ["git", "ls-files", "--others", "--exclude-standard"]  # outside git: DVC says so
    untracked = subprocess.run(git, capture_output=True, text=True, check=False).stdout.split()
    if found := [path for path in untracked if path.endswith(".dvc")]:
        raise PipelineError(f"{', '.join(found)}: not in git, so not in a trial's copy, and "
                            "DVC would rewrite it; `git add` it first")  # fmt: skip
    study = make_study(storage, search, args.worker)
    held = [optuna.trial.TrialState[s] for s in STATES[:3]]
    optuna.storages.fail_stale_trials(study)  # a dead worker's trial: failed, enqueued again
    todo = search.budget.trials - len(study.get_trials(False, states=held))
    if args.push:  # DVC's own: each complete trial's experiment, data and run cache
        os.environ.update(DVC_EXP_AUTO_PUSH="true", DVC_EXP_GIT_REMOTE=args.push)

    # Ctrl-C or kill -INT (SIGINT ignored in a background job) stops trials at their next look.
    signal.signal(signal.SIGINT, lambda *_: STOP.set())
    # After each trial; two workers asking for the last trial at one moment both run it.
    budget = optuna.study.MaxTrialsCallback(search.budget.trials, held)
    try:
        study.optimize(lambda trial: run_trial(trial, search, out), max(todo, 0),
                       search.budget.minutes and 60 * search.budget.minutes, args.jobs,
                       callbacks=[budget], show_progress_bar=True)  # fmt: skip
    except KeyboardInterrupt:
        print(f"Interrupted: the running trial is marked failed and its outputs are gone; "
              f"rerun the same command to resume {search.study!r}", file=sys.stderr)  # fmt: skip
        raise SystemExit(130) from None
    report(study, search, out)


if __name__ == "__main__":
    run_cli(main)
