"""dvc.yaml, params.yaml and the code agree: commands exist, each stage depends on exactly
the code it runs, the data it reads and the params that can change its output."""

import ast
import importlib
import re
import typing

import pytest
import yaml

from tests.conftest import ROOT

DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
STAGES = DVC["stages"]
VARS = {key: value for entry in DVC["vars"] for key, value in entry.items()}


def schema(stage):
    return importlib.import_module(f"stages.{stage}").Params


def imported_files(path):
    """The project modules (stages.*, tools.*) that the file at `path` imports."""
    found = set()
    for node in ast.walk(ast.parse((ROOT / path).read_text())):
        if isinstance(node, ast.ImportFrom) and node.module in ("stages", "tools"):
            found |= {f"{node.module}/{alias.name}.py" for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
            ("stages.", "tools.")
        ):
            found.add(node.module.replace(".", "/") + ".py")
    return {f for f in found if (ROOT / f).is_file()}  # `from stages import x` of a name


def code_of(stage):
    """stages/<stage>.py and every project module it imports, transitively."""
    seen, todo = set(), [f"stages/{stage}.py"]
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo += imported_files(path)
    return seen


def lookup(key):
    """A ${key} of dvc.yaml: one of its vars, or a dotted params.yaml key."""
    if key in VARS:
        return VARS[key]
    section, name = key.split(".")
    return PARAMS[section][name]


def expand(path):
    return re.sub(r"\$\{([\w.]+)\}", lambda m: lookup(m.group(1)), path)


def outputs(stage):
    entries = [*STAGES[stage].get("outs", []), *STAGES[stage].get("metrics", [])]
    entries += STAGES[stage].get("plots", [])
    return {expand(next(iter(e)) if isinstance(e, dict) else e) for e in entries}


def check_deps(stages):
    """The problems with each stage's deps and params, as sentences; [] when all agree."""
    problems = []
    earlier = set()
    for stage, spec in stages.items():
        deps = [expand(d) for d in spec.get("deps", [])]
        code = {d for d in deps if d.endswith(".py")}
        if code != code_of(stage):
            problems.append(
                f"{stage}: code deps {sorted(code)} but it runs {sorted(code_of(stage))}"
            )
        # The pipeline's inputs: the dataset that fetch.source names and the feedback folder
        # of fetch.feedback, fetch's alone.
        inputs = {PARAMS["fetch"]["source"], PARAMS["fetch"]["feedback"]}
        source = inputs if stage == "fetch" else set()
        for data in set(deps) - code:
            if data not in earlier | source:
                problems.append(f"{stage}: {data} is no output of an earlier stage")
        fields = schema(stage).model_fields
        tracked = [f"{stage}.{k}" for k in fields if k not in schema(stage).untracked]
        if spec.get("params", []) != tracked:
            problems.append(f"{stage}: params {spec.get('params', [])}, expected {tracked}")
        earlier |= outputs(stage)
    return problems


def test_the_pipeline_has_the_five_stages_in_order():
    assert list(STAGES) == ["fetch", "prepare", "train", "evaluate", "export"]


@pytest.mark.parametrize("stage", list(STAGES))
def test_each_stage_runs_its_own_module(stage):
    cmd = " ".join(STAGES[stage]["cmd"].split())
    assert cmd.startswith(f"python -m stages.{stage} "), cmd


def test_each_stage_depends_on_its_code_its_data_and_its_output_changing_params():
    assert check_deps(STAGES) == []


def test_a_stray_or_missing_dependency_is_caught():
    stray = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    stray["train"]["deps"].append("stages/figures.py")  # evaluate's, not train's
    stray["export"]["deps"].remove("stages/inference.py")
    stray["fetch"]["params"].append("fetch.timeout_s")  # checksums decide: cannot change it
    stray["evaluate"]["deps"].append("data/nowhere")
    stray["prepare"]["deps"].append("${fetch.source}")  # fetch's input, not prepare's
    problems = check_deps(stray)
    assert [p.split(":")[0] for p in problems] == [
        "fetch",
        "prepare",
        "train",
        "evaluate",
        "export",
    ]
    fetch_params = (
        "fetch.source, fetch.feedback, fetch.image_size, fetch.channels, fetch.test_split, "
        "fetch.seed"
    )
    assert f"fetch: params [{fetch_params}, fetch.timeout_s], expected [{fetch_params}]" in [
        p.replace("'", "") for p in problems
    ]
    assert "prepare: data/mnist.yaml is no output of an earlier stage" in problems
    assert "evaluate: data/nowhere is no output of an earlier stage" in problems


def test_no_stage_runs_another_stages_module():
    # So that editing one stage's schema or code reruns that stage and what follows only.
    for stage in STAGES:
        others = {f"stages/{s}.py" for s in STAGES if s != stage}
        assert not code_of(stage) & others, stage


@pytest.mark.parametrize("stage", list(STAGES))
def test_params_yaml_has_exactly_the_keys_each_stage_declares(stage):
    assert schema(stage).section == stage
    assert list(PARAMS[stage]) == list(schema(stage).model_fields)


def test_params_yaml_has_no_section_the_code_does_not_read():
    assert list(PARAMS) == list(STAGES)


def test_every_param_carries_a_comment():
    for line in (ROOT / "params.yaml").read_text().splitlines():
        if re.match(r"^  \w+:", line):
            assert "#" in line or line.rstrip().endswith(":"), f"no comment: {line!r}"


def test_train_model_accepts_exactly_the_presets_and_each_has_a_recipe():
    from stages import models

    choices = typing.get_args(schema("train").model_fields["model"].annotation)
    assert choices == tuple(models.BUILDERS) == tuple(models.RECIPES)
