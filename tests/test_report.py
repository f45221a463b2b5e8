"""The comparison report, rendered from hand-made `dvc metrics/params diff` output."""

import pytest

from stages.common import PipelineError
from tools import report

METRICS = "data/evaluate/metrics.json"
PER_CLASS = "data/evaluate/per_class.json"
METRICS_DIFF = {
    METRICS: {
        "accuracy": {"old": 0.9908, "new": 0.9921, "diff": 0.0013},
        "loss": {"old": 0.03, "new": 0.025, "diff": -0.005},
        "errors": {"old": 92, "new": 79, "diff": -13},
        "dtype_policy": {"old": "float32", "new": "mixed_bfloat16"},
    },
    PER_CLASS: {
        "3.f1": {"old": 0.99, "new": 0.995, "diff": 0.005},
        "4.f1": {"old": 0.98, "new": 0.98, "diff": 0.0},
    },
}
PARAMS_DIFF = {"params.yaml": {"train.epochs": {"old": 12, "new": 15, "diff": 3}}}


def test_verdict_states_the_change_in_percentage_points():
    assert report.verdict(METRICS_DIFF, METRICS, "main") == (
        "**Test accuracy up by 0.13 pp**: 99.08% → 99.21% (against `main`)"
    )
    down = {METRICS: {"accuracy": {"old": 0.99, "new": 0.985}}}
    assert report.verdict(down, METRICS, "v1").startswith("**Test accuracy down by 0.50 pp**")
    same = {METRICS: {"accuracy": {"old": 0.99, "new": 0.99}}}
    assert report.verdict(same, METRICS, "v1").startswith("**Test accuracy unchanged**: 99.00%")


def test_base_without_metrics_is_an_error():
    no_base = {METRICS: {"accuracy": {"old": None, "new": 0.99}}}
    with pytest.raises(PipelineError) as error:
        report.verdict(no_base, METRICS, "old-branch")
    assert str(error.value) == (
        f"base revision 'old-branch' has no {METRICS}; reproduce and commit it there first"
    )


def test_render_has_the_tables_the_moved_metrics_and_the_figures():
    text = report.render(
        "main",
        METRICS_DIFF,
        PARAMS_DIFF,
        METRICS,
        {"Confusion matrix": "data/evaluate/plots/confusion.png"},
    )
    assert f"| `{METRICS}` | accuracy | 0.9908 | 0.9921 | +0.0013 |" in text
    assert f"| `{METRICS}` | errors | 92 | 79 | -13 |" in text
    headline = [line.split(" | ")[1] for line in text.splitlines() if f"| `{METRICS}` |" in line]
    assert headline == ["accuracy", "loss", "errors", "dtype_policy"]  # the README's order
    assert f"| `{METRICS}` | dtype_policy | float32 | mixed_bfloat16 | changed |" in text
    assert text.startswith("# What this change did to the model\n\n**Test accuracy up")
    assert "| `train.epochs` | 12 | 15 |" in text
    assert f"| `{PER_CLASS}` | 3.f1 | 0.9900 | 0.9950 | +0.0050 |" in text
    assert "4.f1" not in text  # unchanged, so left out
    assert "moved (1)" in text
    assert "![Confusion matrix](data/evaluate/plots/confusion.png)" in text


def test_render_without_param_changes_says_so():
    text = report.render("main", METRICS_DIFF, {}, METRICS, {})
    assert "No param differs from `main`." in text
    assert "## Figures" not in text
