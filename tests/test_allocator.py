"""The train stage on tcmalloc: re-executed with it preloaded where it is installed, the
choice given by TRAIN_ALLOCATOR, and the same model bytes on either allocator."""

import ctypes.util
import os
import subprocess
import sys

import pytest

from stages import allocator
from tests.conftest import ROOT, copy_reproduced, user_env

INSTALLED = ctypes.util.find_library("tcmalloc_minimal") == allocator.LIBRARY
needs_tcmalloc = pytest.mark.skipif(
    not INSTALLED and not os.environ.get("REQUIRE_TCMALLOC"),  # .ci/run installs it
    reason="tcmalloc not installed (apt-get install libtcmalloc-minimal4)",
)
REPORT = (
    "import os; from stages import allocator; allocator.preload({name!r});"
    " print(allocator.in_use(), '|', os.environ.get('LD_PRELOAD', ''))"
)


def run_as(name, choice=None):
    """A process that calls preload(name) as a stage would: (rc, output)."""
    env = {k: v for k, v in user_env().items() if k not in ("LD_PRELOAD", allocator.CHOICE)}
    if choice is not None:
        env[allocator.CHOICE] = choice
    out = subprocess.run(
        [sys.executable, "-c", REPORT.format(name=name)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    return out.returncode, (out.stdout + out.stderr).strip()


@needs_tcmalloc
@pytest.mark.parametrize("choice", [None, "auto", "tcmalloc"])
def test_a_running_stage_reexecutes_itself_on_tcmalloc(choice):
    assert run_as("__main__", choice) == (0, "tcmalloc | libtcmalloc_minimal.so.4")


def test_system_and_an_imported_module_keep_the_c_librarys_malloc():
    assert run_as("__main__", "system") == (0, "the C library's |")
    assert run_as("stages.train", None) == (0, "the C library's |")


def test_a_bad_choice_is_one_line():
    assert run_as("__main__", "jemalloc") == (
        1,
        "Error: TRAIN_ALLOCATOR=jemalloc: use auto, tcmalloc or system",
    )


def test_tcmalloc_asked_for_but_missing_is_one_line_and_auto_goes_on(monkeypatch):
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.setenv(allocator.CHOICE, "tcmalloc")
    with pytest.raises(SystemExit) as e:
        allocator.preload("__main__")
    assert str(e.value) == (
        "Error: TRAIN_ALLOCATOR=tcmalloc but libtcmalloc_minimal.so.4 is not installed"
        " (Debian and Ubuntu: apt-get install libtcmalloc-minimal4), or set it to auto"
    )
    monkeypatch.setenv(allocator.CHOICE, "auto")
    assert allocator.preload("__main__") is None  # returns: no exec without the library


@needs_tcmalloc
def test_the_train_stage_trains_the_same_bytes_on_either_allocator(reproduced, tmp_path):
    assert "using the CPU, allocator tcmalloc" in reproduced[1]  # dvc repro's train
    repo = copy_reproduced(reproduced, tmp_path / "repo")
    args = f"--data data/prepared --model {tmp_path}/system.keras --live {tmp_path}/live"
    out = subprocess.run(
        [sys.executable, "-m", "stages.train", *args.split(), "--checkpoint", tmp_path / "ck"],
        cwd=repo,
        env=user_env({allocator.CHOICE: "system"}),
        capture_output=True,
        text=True,
        check=True,
    )
    assert "using the CPU, allocator the C library's" in out.stdout
    trained = (repo / "data" / "model" / "model.keras").read_bytes()
    assert (tmp_path / "system.keras").read_bytes() == trained
