"""tcmalloc for the train stage: TensorFlow allocates and frees its tensors at every step,
and tcmalloc serves that faster than the C library's malloc (the `fast` preset's `fit`
1.25x faster on 2 cores, byte-identical models: docs/benchmarks.md).

On Linux, TRAIN_ALLOCATOR chooses: auto (or unset) = tcmalloc where it is installed
(Debian and Ubuntu: `apt-get install libtcmalloc-minimal4`; Fedora: `gperftools-libs`),
tcmalloc = tcmalloc or an error, system = the C library's malloc.
"""

import ctypes.util
import os
import sys
from pathlib import Path

LIBRARY = "libtcmalloc_minimal.so.4"
CHOICE = "TRAIN_ALLOCATOR"


def preload(module_name):
    """Called by a stage before its heavy imports: when the stage runs (module_name
    "__main__"), re-executes the same command with tcmalloc preloaded, if it is installed
    and not loaded yet (an allocator must be loaded before the program starts). Imported,
    or with TRAIN_ALLOCATOR=system, it does nothing."""
    if module_name != "__main__":
        return
    choice = os.environ.get(CHOICE) or "auto"
    if choice not in ("auto", "tcmalloc", "system"):
        sys.exit(f"Error: {CHOICE}={choice}: use auto, tcmalloc or system")
    loaded = os.environ.get("LD_PRELOAD", "")
    if choice == "system" or LIBRARY in loaded:
        return
    linux = sys.platform.startswith("linux")
    if not linux or ctypes.util.find_library("tcmalloc_minimal") != LIBRARY:
        if choice == "tcmalloc":
            sys.exit(
                f"Error: {CHOICE}=tcmalloc but {LIBRARY} is not installed (Debian and Ubuntu:"
                " apt-get install libtcmalloc-minimal4), or set it to auto"
            )
        return
    env = {**os.environ, "LD_PRELOAD": " ".join(filter(None, [LIBRARY, loaded]))}
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def in_use():
    """The allocator this process runs on: "tcmalloc" or "the C library's"."""
    maps = Path("/proc/self/maps")
    if maps.exists() and "libtcmalloc" in maps.read_text():
        return "tcmalloc"
    return "the C library's"
