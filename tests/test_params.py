"""Param validation: each bad value stops a stage with one line naming the key."""

import os
import subprocess
import sys

import pytest
import yaml
from pydantic import Field, ValidationError

from stages import evaluate, export, fetch, params, prepare, train
from stages.common import PipelineError
from tests.conftest import ROOT, run_stage, write_params

SCHEMAS = {
    s.section: s
    for s in (fetch.Params, prepare.Params, train.Params, evaluate.Params, export.Params)
}


def section(name):
    return yaml.safe_load((ROOT / "params.yaml").read_text())[name]


def test_the_committed_params_are_valid():
    for name, schema in SCHEMAS.items():
        params.validate(schema, section(name))


@pytest.mark.parametrize(
    "name, key, value, message",
    [
        ("train", "epochs", 0, "train.epochs must be an integer >= 1 or preset, got 0"),
        (
            "train",
            "batch_size",
            "big",
            "train.batch_size must be an integer >= 1 or preset, got 'big'",
        ),
        ("train", "epochs", True, "train.epochs must be an integer >= 1 or preset, got True"),
        (
            "prepare",
            "validation_split",
            1.5,
            "prepare.validation_split must be a number in [0, 1), got 1.5",
        ),
        ("prepare", "train_size", 0, "prepare.train_size must be an integer >= 1 or all, got 0"),
        (
            "train",
            "model",
            "resnet",
            "train.model must be one of reference, compact, best, fast, got 'resnet'",
        ),
        (
            "train",
            "jit_compile",
            "yes",
            "train.jit_compile must be one of auto, true, false, got 'yes'",
        ),
        (
            "train",
            "learning_rate",
            -1,
            "train.learning_rate must be a number > 0 or preset, got -1",
        ),
        ("fetch", "source", "", "fetch.source must be a non-empty string, got ''"),
        (
            "fetch",
            "image_size",
            [28, 0],
            "fetch.image_size must be a list of 2 values, each an integer >= 1 and <= 1024, "
            "got [28, 0]",
        ),
        ("fetch", "channels", 2, "fetch.channels must be one of 1, 3, got 2"),
        ("fetch", "test_split", 1, "fetch.test_split must be a number in (0, 1), got 1"),
        ("fetch", "timeout_s", 0, "fetch.timeout_s must be a number > 0, got 0"),
        (
            "prepare",
            "train_size",
            0.5,
            "prepare.train_size must be an integer >= 1 or all, got 0.5",
        ),
        (
            "evaluate",
            "gallery_size",
            101,
            "evaluate.gallery_size must be an integer >= 1 and <= 100, got 101",
        ),
        ("train", "deterministic", "yes", "train.deterministic must be true or false, got 'yes'"),
        ("train", "seed", "3", "train.seed must be an integer >= 0, got '3'"),
        ("train", "feedback", 0, "train.feedback must be an integer >= 1 or none, got 0"),
        ("fetch", "feedback", "", "fetch.feedback must be a non-empty string, got ''"),
    ],
)
def test_invalid_values_name_the_key_and_what_is_allowed(name, key, value, message):
    values = {**section(name), key: value}
    with pytest.raises(PipelineError) as error:
        params.validate(SCHEMAS[name], values)
    assert str(error.value) == f"params.yaml: {message}"


def test_unknown_and_missing_keys():
    with pytest.raises(PipelineError) as error:
        params.validate(prepare.Params, {**section("prepare"), "shuffle": True})
    assert str(error.value) == (
        "params.yaml: unknown key prepare.shuffle; "
        "allowed keys: train_size, validation_split, test_size"
    )
    with pytest.raises(PipelineError) as error:
        params.validate(prepare.Params, {"train_size": "all", "test_size": "all"})
    assert str(error.value) == "params.yaml: missing key prepare.validation_split"


def test_every_bad_key_is_named_at_once_in_one_line():
    values = {**section("train"), "epochs": 0, "seed": -1, "momentum": 0.9}
    with pytest.raises(PipelineError) as error:
        params.validate(train.Params, values)
    assert str(error.value) == (
        "params.yaml: train.seed must be an integer >= 0, got -1; "
        "train.epochs must be an integer >= 1 or preset, got 0; "
        "unknown key train.momentum; allowed keys: model, seed, epochs, batch_size, "
        "learning_rate, label_smoothing, recolour, mixed_precision, jit_compile, "
        "deterministic, distribute, feedback"
    )


class Limits(params.Section):
    section = "demo"

    below: float = Field(le=5)
    open_range: float = Field(gt=0, lt=1)
    name: str
    flag: bool | None


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("below", 6.0, "demo.below must be a number <= 5, got 6.0"),
        ("open_range", 1.0, "demo.open_range must be a number in (0, 1), got 1.0"),
        ("name", 3, "demo.name must be a string, got 3"),
        ("flag", "no", "demo.flag must be true or false or null, got 'no'"),
    ],
)
def test_any_declaration_is_described_from_its_schema(key, value, message):
    values = {"below": 1.0, "open_range": 0.5, "name": "x", "flag": None, key: value}
    with pytest.raises(PipelineError) as error:
        params.validate(Limits, values)
    assert str(error.value) == f"params.yaml: {message}"


def test_valid_values_become_a_frozen_object():
    values = {"train_size": 5000, "validation_split": 0, "test_size": "all"}
    p = params.validate(prepare.Params, values)
    assert (p.train_size, p.validation_split, p.test_size) == (5000, 0, "all")
    with pytest.raises(ValidationError, match="frozen"):
        p.train_size = 1


def test_missing_params_file(workdir):
    with pytest.raises(PipelineError) as error:
        params.load(train.Params)
    assert str(error.value) == "params.yaml not found; run the stage from the project root"


def test_a_stage_with_a_bad_param_exits_1_with_one_line_and_writes_nothing(workdir):
    write_params(workdir / "params.yaml", train__epochs=0)
    result = run_stage(
        "train",
        "--data",
        "prepared",
        "--model",
        "m/model.keras",
        "--live",
        "live",
        "--checkpoint",
        "ckpt",
        cwd=workdir,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "Error: params.yaml: train.epochs must be an integer >= 1 or preset, got 0"
    )
    assert sorted(p.name for p in workdir.iterdir()) == ["params.yaml"]


@pytest.mark.parametrize("stage", ["train", "evaluate", "export"])
def test_a_bad_param_stops_the_stage_before_tensorflow_is_imported(workdir, stage):
    write_params(
        workdir / "params.yaml", train__epochs=0, evaluate__batch_size=0, export__batch_size=0
    )
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", f"stages.{stage}"],
        cwd=workdir,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1].startswith(f"Error: params.yaml: {stage}.")
    imported = [line.split("|")[-1].strip() for line in result.stderr.splitlines()]
    assert "stages.params" in imported
    assert "tensorflow" not in imported and "keras" not in imported
