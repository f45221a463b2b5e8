"""Reads one section of params.yaml, validates it, and returns it as a frozen object.

Each section is one pydantic model below: a key's type and allowed range are declared on
its line, once. Every stage calls `load(section)` before any work: an unknown key, a
missing key, a wrong type or an out-of-range value raises a PipelineError naming the key
and what is allowed, e.g. `params.yaml: train.epochs must be an integer >= 1, got 0`.
"""

import types
import typing
from pathlib import Path
from typing import Annotated, Literal

import annotated_types as at
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stages.common import PipelineError

PARAMS_FILE = "params.yaml"  # DVC's default; stages run from the project root

Url = Annotated[str, Field(pattern=r"^https?://")]


class Section(BaseModel):
    # strict: 1 is not True and "3" is not 3; extra="forbid": a typo'd key is an error.
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class Fetch(Section):
    mirrors: tuple[Url, ...] = Field(min_length=1, strict=False)  # tried after $MNIST_MIRROR
    timeout_s: float = Field(gt=0)  # per HTTP request


class Prepare(Section):
    train_size: int | None = Field(ge=1, le=60_000)  # first N training images; None = all
    validation_split: float = Field(ge=0, lt=1)  # last fraction held out, as Keras does


class Train(Section):
    model: Literal["reference", "compact", "best", "fast"]  # a preset of stages/models.py
    seed: int = Field(ge=0)
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)  # global: split across replicas
    learning_rate: float = Field(gt=0)
    mixed_precision: Literal["auto", "float32", "mixed_float16", "mixed_bfloat16"]
    jit_compile: Literal["auto", True, False]
    deterministic: bool
    distribute: Literal["auto", "none", "mirrored"]


class Evaluate(Section):
    batch_size: int = Field(ge=1)
    gallery_size: int = Field(ge=1, le=100)


class Export(Section):
    batch_size: int = Field(ge=1)  # parity runs and the large-batch timing
    tolerance: float = Field(gt=0)  # max |Δp|, exports against Keras in float32
    precision_tolerance: float = Field(gt=0)  # max |Δp|, float32 export vs the model as trained


SECTIONS = {
    "fetch": Fetch,
    "prepare": Prepare,
    "train": Train,
    "evaluate": Evaluate,
    "export": Export,
}


def describe(annotation, metadata):
    """What a field allows, in words: 'an integer >= 1', 'one of auto, true, false', ..."""
    bounds = {type(m): m for m in metadata}
    if typing.get_origin(annotation) is Literal:
        choices = typing.get_args(annotation)
        return "one of " + ", ".join(str(c).lower() if isinstance(c, bool) else c for c in choices)
    if isinstance(annotation, types.UnionType):  # X | None
        inner = next(a for a in typing.get_args(annotation) if a is not type(None))
        return describe(inner, metadata) + " or null"
    if annotation is bool:
        return "true or false"
    if annotation is int:
        words = ["an integer"]
        if at.Ge in bounds:
            words.append(f">= {bounds[at.Ge].ge}")
        if at.Le in bounds:
            words.append(f"and <= {bounds[at.Le].le}")
        return " ".join(words)
    if annotation is float:
        if at.Lt in bounds:
            return f"a number in [{bounds[at.Ge].ge}, {bounds[at.Lt].lt})"
        return f"a number > {bounds[at.Gt].gt}"
    if typing.get_origin(annotation) is tuple:
        return "a non-empty list of http(s) URLs"
    raise TypeError(f"no description for {annotation}")


def validate(section, values, source=PARAMS_FILE):
    """Checks a section's dict and returns its frozen model."""
    model = SECTIONS[section]
    if not isinstance(values, dict):
        raise PipelineError(f"{source}: section '{section}' must be a mapping of keys to values")
    try:
        return model(**values)
    except ValidationError as e:
        error = e.errors()[0]
        key = error["loc"][0]
        if error["type"] == "extra_forbidden":
            allowed = ", ".join(model.model_fields)
            message = f"unknown key {section}.{key}; allowed keys: {allowed}"
        elif error["type"] == "missing":
            message = f"missing key {section}.{key}"
        else:
            field = model.model_fields[key]
            allowed = describe(field.annotation, field.metadata)
            message = f"{section}.{key} must be {allowed}, got {values[key]!r}"
        raise PipelineError(f"{source}: {message}") from None


def load(section, path=PARAMS_FILE):
    """Reads `section` of the YAML params file at `path` and validates it."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path} not found; run the stage from the project root") from None
    except yaml.YAMLError as e:
        raise PipelineError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(doc, dict) or section not in doc:
        raise PipelineError(f"{path}: missing section '{section}'")
    return validate(section, doc[section], source=str(path))
