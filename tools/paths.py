"""The project's files by name: the pipeline's paths, read by key from dvc.yaml's `vars`
(where they are named once), and edits of params.yaml that keep its comments."""

import io
from pathlib import Path

import yaml

from stages.common import PipelineError


def dvc_var(key, dvc_yaml="dvc.yaml"):
    """The value of `key` in dvc.yaml's vars (a list of mappings): "export" -> "data/export"."""
    path = Path(dvc_yaml)
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path} not found; run this from the project root") from None
    for entry in (doc or {}).get("vars", []):
        if isinstance(entry, dict) and key in entry:
            return entry[key]
    raise PipelineError(f"{path}: no `{key}` in vars")


def represent_float(representer, value):
    """A float as YAML 1.1 reads it too: ruamel writes 1e-09, which PyYAML (the stages'
    reader) takes for a string; 1.0e-09 is a float to both."""
    text = repr(value)
    if "e" in text and "." not in text.split("e")[0]:
        mantissa, exponent = text.split("e")
        text = f"{mantissa}.0e{exponent}"
    return representer.represent_scalar("tag:yaml.org,2002:float", text)


def set_params(path, updates):
    """Sets dotted keys of the params file at `path` ({"train.epochs": 1}) in place,
    keeping its comments and layout, as a user's edit or `dvc exp run -S` would. A key the
    file lacks is an error: a typo must not add a key no stage reads."""
    from ruamel.yaml import YAML  # here: predict reads dvc.yaml through this module

    path = Path(path)
    yaml_rt = YAML()  # round-trip: comments, order and block/flow style survive
    yaml_rt.width = 4096  # never fold a long line
    yaml_rt.representer.add_representer(float, represent_float)
    doc = yaml_rt.load(path.read_text())
    for key, value in updates.items():
        *parents, name = key.split(".")
        node = doc
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or name not in node:
            raise PipelineError(f"{path}: no key {key}")
        node[name] = value
    stream = io.StringIO()
    yaml_rt.dump(doc, stream)
    path.write_text(stream.getvalue())
