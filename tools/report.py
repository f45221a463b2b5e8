"""Report: one Markdown file that says what the workspace changed against a base revision.

    python -m tools.report --base main [--out report.md]

Runs `dvc metrics diff` (the headline metrics, and the per-class ones by name) and
`dvc params diff` against BASE and writes OUT: a one-line verdict on test accuracy (and on
the feedback test accuracy, with feedback), the metric and param tables, and the evaluate
stage's figures.
This is what CI posts on a pull request. Fails if BASE has no test metrics.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from stages.common import PipelineError, atomic_file, run_cli
from tools.paths import dvc_var

FIGURES = {  # title -> file name under the evaluate stage's plots/
    "Training curves": "curves.png",
    "Confusion matrix": "confusion.png",
    "Most confident mistakes": "errors.png",
}
# Always shown (the feedback ones with feedback); others if they moved.
HEADLINE = ("accuracy", "loss", "errors", "dtype_policy", "feedback.accuracy", "feedback.images")


def dvc_json(*args):
    """Runs `dvc <args> --json` and returns the parsed output."""
    # DVC of this interpreter's environment, whatever is first on PATH.
    command = [sys.executable, "-m", "dvc", *args, "--json"]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise PipelineError(f"`dvc {' '.join(args)}` failed: {last}")
    return json.loads(result.stdout or "{}")


def fmt(value):
    """Metric values: 4 decimals for floats."""
    if value is None:
        return "—"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def fmt_param(value):
    """Param values exactly as YAML has them (1.0 stays 1.0)."""
    return "null" if value is None else str(value)


def fmt_change(entry):
    diff = entry.get("diff")
    if isinstance(diff, float):
        return f"{diff:+.4f}"
    if isinstance(diff, int) and not isinstance(diff, bool):
        return f"{diff:+d}"
    if entry.get("old") is None and entry.get("new") is not None:
        return "new"
    return "changed" if entry.get("old") != entry.get("new") else ""


def verdict(metrics_diff, metrics_path, base):
    """The one-line summary of what happened to test accuracy."""
    entry = metrics_diff.get(metrics_path, {}).get("accuracy")
    if entry is None or entry.get("new") is None:
        raise PipelineError(f"the workspace has no {metrics_path}; run `dvc repro` first")
    if entry.get("old") is None:
        raise PipelineError(
            f"base revision '{base}' has no {metrics_path}; reproduce and commit it there first"
        )
    old, new = entry["old"], entry["new"]
    points = 100 * (new - old)
    direction = "up" if points > 0 else "down" if points < 0 else "unchanged"
    by = f" by {abs(points):.2f} pp" if points else ""
    line = (
        f"**Test accuracy {direction}{by}**: {100 * old:.2f}% → {100 * new:.2f}% (against `{base}`)"
    )
    return line + feedback_verdict(metrics_diff.get(metrics_path, {}))


def feedback_verdict(entries):
    """'; feedback test accuracy 50.00% → 75.00% (12 images)', or '' without feedback."""
    accuracy = entries.get("feedback.accuracy", {})
    if accuracy.get("new") is None:
        return ""
    images = entries.get("feedback.images", {}).get("new")
    change = f"{100 * accuracy['old']:.2f}% → " if accuracy.get("old") is not None else ""
    return f"; feedback test accuracy {change}{100 * accuracy['new']:.2f}% ({images} images)"


def table(rows, header):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def headline_order(name, _entry):
    return (HEADLINE.index(name) if name in HEADLINE else len(HEADLINE), name)


def metric_rows(metrics_diff, metrics_path, headline):
    """Headline rows (always, in HEADLINE's order), or the other rows whose value moved."""
    rows = []
    for path, entries in sorted(metrics_diff.items()):
        for name, e in sorted(entries.items(), key=lambda item: headline_order(*item)):
            is_headline = path == metrics_path and name in HEADLINE
            if is_headline == headline and (headline or e.get("old") != e.get("new")):
                rows.append(
                    [f"`{path}`", name, fmt(e.get("old")), fmt(e.get("new")), fmt_change(e)]
                )
    return rows


def render(base, metrics_diff, params_diff, metrics_path, figures):
    """The Markdown report. figures: {title: image path relative to the report}."""
    header = ["file", "metric", base, "workspace", "change"]
    parts = [f"# What this change did to the model\n\n{verdict(metrics_diff, metrics_path, base)}"]
    parts.append("## Metrics\n\n" + table(metric_rows(metrics_diff, metrics_path, True), header))
    moved = metric_rows(metrics_diff, metrics_path, headline=False)
    if moved:
        parts.append(
            "<details><summary>Training, export and per-class metrics that moved "
            f"({len(moved)})</summary>\n\n{table(moved, header)}\n\n</details>"
        )
    param_rows = [
        [f"`{name}`", fmt_param(e.get("old")), fmt_param(e.get("new"))]
        for entries in params_diff.values()
        for name, e in sorted(entries.items())
    ]
    parts.append(
        "## Params\n\n"
        + (
            table(param_rows, ["param", base, "workspace"])
            if param_rows
            else f"No param differs from `{base}`."
        )
    )
    if figures:
        parts.append(
            "## Figures (workspace)\n\n"
            + "\n\n".join(f"### {title}\n\n![{title}]({path})" for title, path in figures.items())
        )
    parts.append(f"Side by side with `{base}`, interactive: `dvc plots diff {base} --open`.")
    return "\n\n".join(parts) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="git revision to compare against")
    parser.add_argument("--out", default="report.md", help="Markdown file to write")
    args = parser.parse_args(argv)
    evaluation = Path(dvc_var("evaluation"))
    metrics_path = str(evaluation / "metrics.json")
    metrics_diff = dvc_json("metrics", "diff", args.base, "--all")
    # Per-class metrics are no DVC metrics by default (40 columns): asked for by name.
    per_class = str(evaluation / "per_class.json")
    metrics_diff |= dvc_json("metrics", "diff", args.base, "--all", "--targets", per_class)
    params_diff = dvc_json("params", "diff", args.base)
    out = Path(args.out).resolve()
    figures = {
        title: os.path.relpath((evaluation / "plots" / name).resolve(), out.parent)
        for title, name in FIGURES.items()
        if (evaluation / "plots" / name).exists()
    }
    text = render(args.base, metrics_diff, params_diff, metrics_path, figures)
    with atomic_file(out) as tmp:
        tmp.write_text(text)
    print(f"report: {verdict(metrics_diff, metrics_path, args.base)}\nreport: wrote {args.out}")


if __name__ == "__main__":
    run_cli(main)
