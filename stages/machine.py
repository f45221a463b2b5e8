"""The CPU's model, class and cores, read from /proc/cpuinfo: the train stage picks bfloat16
by the class, and every figure of the docs names it (`python -m tools.machine`).

The class is the best of these the CPU lists: AMX, AVX-512 BF16, AVX-512, AVX2. The first
two multiply bfloat16 natively; on the others oneDNN emulates it, slower than float32.
"""

import os
import platform
from pathlib import Path

CPUINFO = "/proc/cpuinfo"
CLASSES = {  # class -> its /proc/cpuinfo flag, best first
    "AMX": "amx_bf16",
    "AVX-512 BF16": "avx512_bf16",
    "AVX-512": "avx512f",
    "AVX2": "avx2",
}
NATIVE_BF16 = {"AMX", "AVX-512 BF16"}


def read_cpu(cpuinfo=CPUINFO):
    """(model name, flags) of the first processor of `cpuinfo`; (None, frozenset()) where
    the file cannot be read (not Linux)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return None, frozenset()
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())  # the first processor's, of each key
    return fields.get("model name"), frozenset(fields.get("flags", "").split())


def cpu_class(flags):
    """The best class of CLASSES that `flags` has, else the architecture ('x86_64')."""
    return next((name for name, flag in CLASSES.items() if flag in flags), platform.machine())


def cpu_has_bf16(cpuinfo=CPUINFO):
    """True when the CPU multiplies bfloat16 natively (AMX or AVX-512 BF16), so oneDNN runs
    bf16 convolutions faster than float32 ones; elsewhere bf16 would be emulated, slower."""
    return cpu_class(read_cpu(cpuinfo)[1]) in NATIVE_BF16


def describe_cpu(cpuinfo=CPUINFO):
    """'AMD EPYC 9R14, AVX-512 BF16, 2 cores': what a figure names its machine by."""
    model, flags = read_cpu(cpuinfo)
    name = model or platform.processor() or platform.machine()
    return f"{name}, {cpu_class(flags)}, {os.cpu_count()} cores"
