"""Reads one section of params.yaml, validates it, and returns it as a frozen dataclass.

Every stage calls `load(section)` once, before any work: an unknown key, a missing key,
a wrong type or an out-of-range value raises a PipelineError naming the key and what
is allowed.
"""

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import yaml

from stages.common import PipelineError

PARAMS_FILE = "params.yaml"  # DVC's default; stages run from the project root


@dataclass(frozen=True)
class Rule:
    allowed: str  # said in the error message: "train.epochs must be <allowed>, got 0"
    check: object  # value -> bool


def integer(lo, hi=None, none_ok=False):
    allowed = f"an integer >= {lo}" + (f" and <= {hi}" if hi is not None else "")
    return Rule(
        allowed + (" or null" if none_ok else ""),
        lambda v: (
            (none_ok and v is None) or (type(v) is int and v >= lo and (hi is None or v <= hi))
        ),
    )


def number(lo, hi, hi_open=False):
    bracket = ")" if hi_open else "]"
    return Rule(
        f"a number in [{lo}, {hi}{bracket}",
        lambda v: type(v) in (int, float) and lo <= v and (v < hi if hi_open else v <= hi),
    )


def positive_number():
    return Rule("a number > 0", lambda v: type(v) in (int, float) and v > 0)


def one_of(*choices):
    return Rule(
        "one of " + ", ".join(str(c).lower() if isinstance(c, bool) else str(c) for c in choices),
        lambda v: any(v == c and type(v) is type(c) for c in choices),
    )


def boolean():
    return Rule("true or false", lambda v: type(v) is bool)


def url_list():
    return Rule(
        "a non-empty list of http(s) URLs",
        lambda v: (
            isinstance(v, list)
            and len(v) > 0
            and all(isinstance(u, str) and u.startswith(("http://", "https://")) for u in v)
        ),
    )


@dataclass(frozen=True)
class FetchParams:
    mirrors: tuple  # base URLs, tried in order after $MNIST_MIRROR
    timeout_s: float  # per HTTP request


@dataclass(frozen=True)
class PrepareParams:
    train_size: int | None  # first N of the 60,000 training images; None = all
    validation_split: float  # last fraction of the training set held out, as Keras does


@dataclass(frozen=True)
class TrainParams:
    model: str
    seed: int
    epochs: int
    batch_size: int
    learning_rate: float
    mixed_precision: str
    jit_compile: object  # "auto", True or False
    deterministic: bool
    distribute: str


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int
    gallery_size: int


RULES = {
    "fetch": (FetchParams, {"mirrors": url_list(), "timeout_s": positive_number()}),
    "prepare": (
        PrepareParams,
        {
            "train_size": integer(1, 60_000, none_ok=True),
            "validation_split": number(0, 1, hi_open=True),
        },
    ),
    "train": (
        TrainParams,
        {
            "model": one_of("reference", "compact", "best"),
            "seed": integer(0),
            "epochs": integer(1),
            "batch_size": integer(1),
            "learning_rate": positive_number(),
            "mixed_precision": one_of("auto", "float32", "mixed_float16", "mixed_bfloat16"),
            "jit_compile": one_of("auto", True, False),
            "deterministic": boolean(),
            "distribute": one_of("auto", "none", "mirrored"),
        },
    ),
    "evaluate": (
        EvaluateParams,
        {"batch_size": integer(1), "gallery_size": integer(1, 100)},
    ),
}


def validate(section, values, source=PARAMS_FILE):
    """Checks a section's dict against RULES and returns its dataclass."""
    cls, rules = RULES[section]
    if not isinstance(values, dict):
        raise PipelineError(f"{source}: section '{section}' must be a mapping of keys to values")
    unknown = sorted(set(values) - set(rules))
    if unknown:
        raise PipelineError(
            f"{source}: unknown key {section}.{unknown[0]}; allowed keys: {', '.join(rules)}"
        )
    missing = [k for k in rules if k not in values]
    if missing:
        raise PipelineError(f"{source}: missing key {section}.{missing[0]}")
    for key, rule in rules.items():
        if not rule.check(values[key]):
            raise PipelineError(
                f"{source}: {section}.{key} must be {rule.allowed}, got {values[key]!r}"
            )
    fields = {f.name: values[f.name] for f in dataclasses.fields(cls)}
    if "mirrors" in fields:
        fields["mirrors"] = tuple(fields["mirrors"])
    return cls(**fields)


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
