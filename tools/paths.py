"""The pipeline's paths, read by key from dvc.yaml's `vars`, where they are named once."""

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
