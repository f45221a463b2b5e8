"""dvc.yaml, params.yaml and the code agree: commands exist, deps cover the code each
stage runs, and each stage lists exactly the params its section has."""

import ast
import re
import typing

import pytest
import yaml

from stages import params
from tests.conftest import ROOT

DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
STAGES = DVC["stages"]


def stage_modules(module):
    """`module` and every stages.* module it imports, transitively."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        tree = ast.parse((ROOT / "stages" / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "stages":
                todo += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("stages."):
                todo.append(node.module.split(".")[1])
    return seen


def test_the_pipeline_has_the_five_stages_in_order():
    assert list(STAGES) == ["fetch", "prepare", "train", "evaluate", "export"]


@pytest.mark.parametrize("stage", list(STAGES))
def test_each_stage_runs_its_own_module_and_depends_on_all_its_code(stage):
    cmd = " ".join(STAGES[stage]["cmd"].split())
    assert cmd.startswith(f"python -m stages.{stage} "), cmd
    code_deps = {d for d in STAGES[stage]["deps"] if d.startswith("stages/")}
    assert code_deps == {f"stages/{m}.py" for m in stage_modules(stage)}


@pytest.mark.parametrize("stage", list(STAGES))
def test_each_stage_lists_exactly_the_params_it_reads(stage):
    keys = list(params.SECTIONS[stage].model_fields)
    assert STAGES[stage]["params"] == [f"{stage}.{key}" for key in keys]
    assert list(PARAMS[stage]) == keys


def test_params_yaml_has_no_section_the_code_does_not_read():
    assert list(PARAMS) == list(params.SECTIONS)


def test_every_param_carries_a_comment():
    for line in (ROOT / "params.yaml").read_text().splitlines():
        if re.match(r"^  \w+:", line):
            assert "#" in line or line.rstrip().endswith(":"), f"no comment: {line!r}"


def test_train_model_accepts_exactly_the_presets():
    from stages import models

    choices = typing.get_args(params.Train.model_fields["model"].annotation)
    assert choices == tuple(models.BUILDERS)
