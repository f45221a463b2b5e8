"""Regenerates the real-output samples of DVC commands in README.md and docs/*.md.

Clones the committed HEAD into a scratch directory, brings in the baseline's outputs
(pulled from the checkout's DVC cache, or reproduced with --repro), runs there the
commands the docs show, and rewrites each block between `<!-- sample: NAME -->` and
`<!-- /sample -->` with what sample NAME printed. Rerun it when the baseline changes:

    python -m tools.docs_samples            # --check: report stale blocks, write nothing

The samples train the `fast` preset (one epoch) on a branch and as two experiments; the
baseline is never retrained unless --repro is given. About 6 minutes on 2 CPU cores.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from stages import machine
from stages.common import PipelineError, atomic_file, run_cli
from tools.paths import set_params

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]

# A block: the opening marker, anything (the previous sample), the closing marker, each
# marker a line of its own (a marker quoted in a sentence is not one).
BLOCK = re.compile(
    r"^(<!-- sample: ([\w-]+) -->\n)((?:(?!<!-- sample:).)*?)^(<!-- /sample -->)$",
    re.DOTALL | re.MULTILINE,
)
OPENING = re.compile(r"^<!-- sample: ([\w-]+) -->$", re.MULTILINE)
# What collect() produces; the docs' markers may name only these.
SAMPLES = ("compare", "per-class-diff", "exp-show", "push", "pull")

# Columns `dvc exp show` keeps in the experiments sample.
EXP_COLUMNS = "Experiment|^accuracy$|^errors$|^loss$|train.model|train.seed"


def replace_samples(text, samples, note=""):
    """Returns `text` with the body of every sample block set to samples[NAME], fenced,
    then `note` (where and how it ran) when given. Raises PipelineError for a block whose
    NAME has no sample or an unclosed marker."""
    opened = OPENING.findall(text)
    closed = [m.group(2) for m in BLOCK.finditer(text)]
    if opened != closed:
        missing = next(name for name in opened if opened.count(name) != closed.count(name))
        raise PipelineError(f"sample '{missing}' has no closing <!-- /sample --> marker")

    def body(match):
        name = match.group(2)
        if name not in samples:
            raise PipelineError(f"no sample named '{name}' (known: {', '.join(sorted(samples))})")
        after = f"{note}\n" if note else ""
        return f"{match.group(1)}```\n{samples[name].rstrip()}\n```\n{after}{match.group(4)}"

    return BLOCK.sub(body, text)


class Scratch:
    """A clone of the project where the sample commands run; records what they print."""

    def __init__(self, path):
        self.path = Path(path)
        bin_dir = str(Path(sys.executable).parent)  # DVC runs `python -m stages.X`
        self.env = {
            **os.environ,
            "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
            "DVC_NO_ANALYTICS": "1",
            "GIT_AUTHOR_NAME": "docs",
            "GIT_AUTHOR_EMAIL": "docs@localhost",
            "GIT_COMMITTER_NAME": "docs",
            "GIT_COMMITTER_EMAIL": "docs@localhost",
            "COLUMNS": "200",  # DVC's tables are not wrapped
        }

    def run(self, command):
        """Runs a shell command in the clone; returns its stdout, or raises on failure."""
        print(f"docs_samples: $ {command}", file=sys.stderr, flush=True)
        result = subprocess.run(
            command,
            shell=True,
            cwd=self.path,
            env=self.env,
            capture_output=True,
            text=True,
            check=False,  # a failure is raised below with its stderr
        )
        if result.returncode != 0:
            lines = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()
            last = next((line for line in lines if line.startswith("ERROR")), lines[-1])
            raise PipelineError(f"`{command}` failed with exit code {result.returncode}: {last}")
        return result.stdout

    def shown(self, *commands):
        """Runs the commands; returns them and their output as a `$ ...` transcript."""
        out = []
        for command in commands:
            text = "\n".join(line.rstrip() for line in self.run(command).rstrip().splitlines())
            out.append(f"$ {command}\n{text}" if text else f"$ {command}")
        return "\n".join(out)


def bring_baseline(scratch, cache, repro, overrides=()):
    """Gives the clone the outputs dvc.lock names: from `cache` (a DVC cache or remote),
    else, with `repro`, by reproducing them. `overrides` (KEY=VALUE) change the clone's
    params first and imply `repro`; the reproduced baseline is committed in the clone, so
    that its `main` is what the samples compare against."""
    for override in overrides:
        key, _, value = override.partition("=")
        set_params(scratch.path / "params.yaml", {key: yaml.safe_load(value)})  # as -S reads it
    if overrides:
        scratch.run("git commit -qam 'docs_samples: params overrides'")
        repro = True
    elif cache.is_dir():
        scratch.run(f"dvc remote add --local baseline {cache}")
        try:
            scratch.run("dvc pull --remote baseline")
        except PipelineError:
            if not repro:
                raise
    elif not repro:
        raise PipelineError(
            f"no DVC cache at {cache}; reproduce the baseline there first, or pass --repro"
        )
    if repro:
        scratch.run("dvc repro")
        scratch.run(
            "git add -A && (git diff --cached --quiet || git commit -qm 'docs_samples: baseline')"
        )
    status = scratch.run("dvc status").strip()
    if status != "Data and pipelines are up to date.":
        raise PipelineError(f"the clone's outputs do not match dvc.lock: {status.splitlines()[0]}")


def collect(scratch):
    """Runs every sample's commands in the clone; returns {NAME: transcript}."""
    samples = {}
    params = scratch.path / "params.yaml"

    scratch.run("git checkout -q -b fast")
    set_params(params, {"train.model": "fast"})
    status = scratch.shown("dvc status")
    scratch.run("dvc repro")
    compared = scratch.shown(
        "dvc metrics diff main", "dvc params diff main", "python -m tools.report --base main"
    )
    samples["compare"] = f"{status}\n{compared}"
    samples["per-class-diff"] = scratch.shown(
        "dvc metrics diff main --targets data/evaluate/per_class.json"
    )
    scratch.run("git checkout -q -- . && git checkout -q main && dvc checkout --quiet")

    scratch.run("dvc exp run -n fast-seed-42 -S train.model=fast")
    scratch.run("dvc exp run -n fast-seed-1 -S train.model=fast -S train.seed=1")
    samples["exp-show"] = scratch.shown(f"dvc exp show --drop '.*' --keep '{EXP_COLUMNS}'")
    scratch.run("git checkout -q -- . && dvc checkout --quiet")  # exp run left its results here

    remote = scratch.path.parent / "remote"
    scratch.run(f"dvc remote add --local -d team {remote}")
    samples["push"] = scratch.shown("dvc push")
    other = Scratch(scratch.path.parent / "other")
    subprocess.run(["git", "clone", "--quiet", str(scratch.path), str(other.path)], check=True)
    other.run(f"dvc remote add --local -d team {remote}")
    samples["pull"] = other.shown("dvc pull", "dvc status")
    assert set(samples) == set(SAMPLES), (
        f"collect() made {sorted(samples)}, SAMPLES names {sorted(SAMPLES)}"
    )
    return samples


def provenance(scratch):
    """One line naming the command, the commit and the machine the samples come from."""
    commit = scratch.run("git rev-parse --short main").strip()
    command = "`python -m tools.docs_samples`"
    return f"<sub>{command} on commit {commit}'s baseline; {machine.describe_cpu()}.</sub>"


def rewrite_docs(samples, check, note=""):
    """Rewrites the sample blocks of the docs; returns the files that changed (or would)."""
    texts = {name: (ROOT / name).read_text() for name in DOCS}
    new = {
        name: replace_samples(text, samples, note) for name, text in texts.items()
    }  # all, then write
    changed = [name for name in DOCS if new[name] != texts[name]]
    for name in changed if not check else []:
        with atomic_file(ROOT / name) as tmp:
            tmp.write_text(new[name])
    return changed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cache",
        type=Path,
        default=ROOT / ".dvc" / "cache",
        help="DVC cache or remote holding the baseline's outputs (default: this checkout's cache)",
    )
    parser.add_argument(
        "--repro",
        action="store_true",
        help="reproduce the baseline in the clone when it cannot be pulled",
    )
    parser.add_argument(
        "--check", action="store_true", help="list the files whose samples are stale; write nothing"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a params override for a quick check of this script (e.g. prepare.train_size=500): "
        "reproduces that baseline, prints the samples, writes nothing",
    )
    args = parser.parse_args(argv)

    rewrite_docs(dict.fromkeys(SAMPLES, ""), check=True)  # bad markers fail before any run
    work = Path(tempfile.mkdtemp(prefix="docs-samples-"))
    try:
        subprocess.run(["git", "clone", "--quiet", str(ROOT), str(work / "project")], check=True)
        scratch = Scratch(work / "project")
        bring_baseline(scratch, args.cache.resolve(), args.repro, args.set)
        note = provenance(scratch)
        samples = collect(scratch)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.set:
        for name, text in samples.items():
            print(f"<!-- sample: {name} -->\n{text}\n<!-- /sample -->")
        return
    changed = rewrite_docs(samples, args.check, note)
    verb = "stale" if args.check else "rewrote"
    print(f"docs_samples: {verb}: {', '.join(changed) or 'nothing'}")
    if args.check and changed:
        sys.exit(1)


if __name__ == "__main__":
    run_cli(main)
