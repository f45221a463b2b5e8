"""Reads a stage's section of params.yaml, validates it, and returns it as a frozen object.

Each stage declares its section as a `Section` subclass named `Params` in its own module,
each key's type and range on its line, once; so a change to one stage's schema reruns that
stage only. `load(Params)` checks the section before any work: every unknown key, missing
key, wrong type or out-of-range value is reported in one line that names the key and what
its declaration allows, e.g. `params.yaml: train.epochs must be an integer >= 1, got 0`.
"""

import sys
from pathlib import Path
from typing import Annotated, ClassVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stages.common import PipelineError, run_cli

PARAMS_FILE = "params.yaml"  # DVC's default; stages run from the project root

Url = Annotated[str, Field(pattern=r"^https?://", description="http(s) URLs")]


class Section(BaseModel):
    # strict: 1 is not True and "3" is not 3; extra="forbid": a typo'd key is an error.
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    section: ClassVar[str]  # its name in params.yaml
    # Keys the stage reads that cannot change its output, so dvc.yaml does not list them
    # (DVC would rerun the stage, and everything after it, when they change).
    untracked: ClassVar[tuple[str, ...]] = ()


def bounds(schema, joiner):
    """The JSON schema's numeric limits in words: '>= 1 and <= 100'."""
    words = [
        f"{symbol} {schema[key]:g}"
        for key, symbol in (
            ("minimum", ">="),
            ("exclusiveMinimum", ">"),
            ("maximum", "<="),
            ("exclusiveMaximum", "<"),
        )
        if key in schema
    ]
    return joiner.join(words)


def allowed(schema):
    """What a field's JSON schema (pydantic's rendering of its declaration) allows, in
    words: 'an integer >= 1', 'one of auto, true, false', 'a number in [0, 1)', ...;
    None for a schema it has no words for (a nested model, a mapping)."""
    if "description" in schema and schema.get("type") != "array":
        return schema["description"]
    if "anyOf" in schema:
        options = [allowed(s) for s in schema["anyOf"] if s.get("type") != "null"]
        if None in options:
            return None
        nullable = len(options) < len(schema["anyOf"])
        return " or ".join(options) + (" or null" if nullable else "")
    if "enum" in schema or "const" in schema:
        words = [
            yaml.safe_dump(c).split("\n")[0] for c in schema.get("enum", [schema.get("const")])
        ]
        return words[0] if len(words) == 1 else "one of " + ", ".join(words)
    kind = schema.get("type")
    if kind == "boolean":
        return "true or false"
    if kind == "integer":
        return " ".join(filter(None, ["an integer", bounds(schema, " and ")]))
    if kind == "number":
        low = "[" if "minimum" in schema else "(" if "exclusiveMinimum" in schema else None
        high = "]" if "maximum" in schema else ")" if "exclusiveMaximum" in schema else None
        if low and high:
            lo = schema.get("minimum", schema.get("exclusiveMinimum"))
            hi = schema.get("maximum", schema.get("exclusiveMaximum"))
            return f"a number in {low}{lo:g}, {hi:g}{high}"
        return " ".join(filter(None, ["a number", bounds(schema, " and ")]))
    if kind == "string":
        return "a non-empty string" if schema.get("minLength") else "a string"
    if kind == "array" and "prefixItems" in schema:  # a tuple
        each = [allowed(s) for s in schema["prefixItems"]]
        if None in each:
            return None
        what = each[0] if len(set(each)) == 1 else " / ".join(each)
        return f"a list of {len(each)} values, each {what}"
    if kind == "array":
        items = schema.get("items", {})
        what = items.get("description") or allowed(items)
        if what is None:
            return None
        least = schema.get("minItems", 0)
        if least > 1:
            return f"a list of at least {least} items, each {what}"
        return ("a non-empty list of " if least else "a list of ") + what
    return None


def explain(error, model, prefix="", values=None):
    """A pydantic ValidationError of `model` -> one line naming every bad key once, e.g.
    'train.epochs must be an integer >= 1, got 0; unknown key train.epoch'. Keys are
    named `prefix` + their dotted path; `values`, the dict that was validated, gives a
    bad top-level key's whole value. The one formatter of validation errors: params
    sections, dataset descriptions and search files all report through it."""
    properties = model.model_json_schema().get("properties", {})
    seen = {}  # a key fails once per union branch (and per list item): say it once
    for e in error.errors():
        loc = [str(part) for part in e["loc"]]
        top = loc[0] if loc else None
        words = allowed(properties[top]) if top in properties else None
        if e["type"] == "extra_forbidden":
            name = prefix + ".".join(loc)
            known = f"; allowed keys: {', '.join(model.model_fields)}" if len(loc) == 1 else ""
            line = f"unknown key {name}{known}"
        elif e["type"] == "missing":
            name = prefix + ".".join(loc)
            line = f"missing key {name}"
        elif words:
            name = prefix + top
            got = values[top] if values and top in values else e["input"]
            line = f"{name} must be {words}, got {got!r}"
        else:
            name = prefix + ".".join(loc) if loc else prefix.rstrip(".") or "the top level"
            line = f"{name}: {e['msg'].removeprefix('Value error, ')}"
            if e["type"] != "value_error" and "input" in e:
                line += f", got {e['input']!r}"
        seen.setdefault(name, line)
    return "; ".join(seen.values())


def validate(schema, values, source=PARAMS_FILE):
    """Checks a section's dict against `schema` and returns the frozen object; every bad
    key is named, in one line."""
    if not isinstance(values, dict):
        raise PipelineError(f"{source}: section '{schema.section}' must be a mapping")
    try:
        return schema(**values)
    except ValidationError as e:
        problems = explain(e, schema, f"{schema.section}.", values)
        raise PipelineError(f"{source}: {problems}") from None


def load(schema, path=PARAMS_FILE):
    """Reads schema.section of the YAML params file at `path` and validates it."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path} not found; run the stage from the project root") from None
    except yaml.YAMLError as e:
        raise PipelineError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(doc, dict) or schema.section not in doc:
        raise PipelineError(f"{path}: missing section '{schema.section}'")
    return validate(schema, doc[schema.section], source=str(path))


def check_early(module_name, schema):
    """Called by a stage between its schema and its heavy imports: when the stage runs
    (`python -m stages.X`, module_name "__main__"), a bad param fails in about a second,
    before TensorFlow's start-up; when imported, it does nothing."""
    if module_name == "__main__":
        run_cli(lambda _: load(schema))
        sys.stdout.flush()
