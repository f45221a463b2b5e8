"""Helpers every stage shares: the error type, the CLI wrapper, atomic writes."""

import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path


class PipelineError(Exception):
    """Bad input a user can fix; the CLI prints it as one line and exits 1."""


def run_cli(main, argv=None):
    """Runs a stage's main(); turns a PipelineError into `Error: ...` and exit code 1."""
    try:
        main(argv)
    except PipelineError as e:
        print(f"Error: {e}", file=sys.stderr)
        sys.exit(1)


@contextlib.contextmanager
def atomic_dir(final):
    """Yields an empty temporary directory beside `final`; renames it to `final` on success.

    On any exception the temporary directory is removed and `final` is left as it was,
    so a failed or interrupted stage never leaves a half-written output behind.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would keep the output from other users
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


@contextlib.contextmanager
def atomic_file(final):
    """Yields a temporary path beside `final` (same suffix); renames it to `final` on
    success, removes it on any exception, so `final` is never half-written."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.stem}.tmp{final.suffix}")
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, final)


def write_json(path, obj):
    """Writes `obj` as pretty JSON to `path` atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
