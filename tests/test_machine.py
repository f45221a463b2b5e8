"""The CPU-feature reader (stages.machine) on made-up /proc/cpuinfo files, and the line that
`python -m tools.machine` and every benchmark print."""

import os
import platform
import re
import subprocess
import sys

import pytest

from stages import machine
from tests.conftest import ROOT
from tools import machine as command

AVX2 = "fpu sse2 avx avx2 fma"
AVX512 = f"{AVX2} avx512f avx512dq avx512bw avx512vl avx512_vnni"
AVX512_BF16 = f"{AVX512} avx512_bf16"
AMX = f"{AVX512_BF16} amx_bf16 amx_tile amx_int8"


def write_cpuinfo(path, model, flags, processors=2):
    """A /proc/cpuinfo of `processors` identical blocks, each with these lines among others."""
    block = f"vendor_id\t: X\nmodel name\t: {model}\nflags\t\t: {flags}\nbogomips\t: 5000.00\n"
    path.write_text("\n".join(f"processor\t: {i}\n{block}" for i in range(processors)))
    return path


@pytest.mark.parametrize(
    "flags, cpu_class, native_bf16",
    [
        (AVX2, "AVX2", False),
        (AVX512, "AVX-512", False),
        (AVX512_BF16, "AVX-512 BF16", True),
        (AMX, "AMX", True),
    ],
)
def test_the_class_is_the_best_feature_the_cpu_lists(tmp_path, flags, cpu_class, native_bf16):
    cpuinfo = write_cpuinfo(tmp_path / "cpuinfo", "AMD EPYC 9R14", flags)
    assert machine.read_cpu(cpuinfo) == ("AMD EPYC 9R14", frozenset(flags.split()))
    assert machine.cpu_class(frozenset(flags.split())) == cpu_class
    assert machine.cpu_has_bf16(cpuinfo) is native_bf16
    assert machine.describe_cpu(cpuinfo) == f"AMD EPYC 9R14, {cpu_class}, {os.cpu_count()} cores"


def test_the_first_processor_is_read_and_a_flag_must_match_whole(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nmodel name\t: Intel Xeon\nflags\t\t: avx2 avx512_bf16x\n\n"
        "processor\t: 1\nmodel name\t: other\nflags\t\t: avx2 avx512_bf16\n"
    )
    assert machine.read_cpu(cpuinfo) == ("Intel Xeon", frozenset({"avx2", "avx512_bf16x"}))
    assert not machine.cpu_has_bf16(cpuinfo)


def test_without_a_cpuinfo_nothing_is_native_and_the_class_is_the_architecture(tmp_path):
    missing = tmp_path / "missing"
    assert machine.read_cpu(missing) == (None, frozenset())
    assert not machine.cpu_has_bf16(missing)
    assert machine.cpu_class(frozenset({"fpu", "sse2"})) == platform.machine()


def test_the_line_names_the_gpus_first_and_rounds_the_ceilings():
    cpu = "AMD EPYC 9R14, AVX-512 BF16, 2 cores"
    assert command.format_line(cpu) == f"machine: {cpu}"
    ceilings = {"float32": 383.4, "bfloat16": 770.6}
    assert command.format_line(cpu, [], ceilings) == (
        f"machine: {cpu}, ceilings float32 383 / bfloat16 771 GFLOP/s"
    )
    assert command.format_line("Intel Xeon, AMX, 16 cores", ["NVIDIA H100"], ceilings) == (
        "machine: GPU NVIDIA H100, Intel Xeon, AMX, 16 cores, "
        "ceilings float32 383 / bfloat16 771 GFLOP/s"
    )
    assert command.format_line(cpu, [], ceilings, "AVX2") == (
        f"machine: {cpu}, oneDNN limited to AVX2 (ONEDNN_MAX_CPU_ISA), "
        "ceilings float32 383 / bfloat16 771 GFLOP/s"
    )


def test_the_ceiling_counts_the_reference_models_largest_convolution():
    # 24x24 outputs of 128 channels per image, each 3x3x64 multiply-adds, batch 128
    assert command.conv_flop() == 2 * 128 * (24 * 24 * 128) * (3 * 3 * 64) == 10_871_635_968


def run_python(*args):
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        capture_output=True,
        text=True,
        check=False,
    )


def test_the_command_prints_the_cpu_line_without_importing_tensorflow():
    result = run_python("-m", "tools.machine", "--no-ceilings")
    assert (result.returncode, result.stdout) == (0, f"machine: {machine.describe_cpu()}\n")
    code = "import sys; from tools import machine; machine.main(['--no-ceilings']); "
    result = run_python("-c", code + "print('tensorflow' in sys.modules)")
    assert result.stdout.splitlines()[1:] == ["False"]


@pytest.mark.slow
def test_the_command_measures_both_ceilings():
    result = run_python("-m", "tools.machine")
    assert result.returncode == 0, result.stderr[-2000:]
    cpu = re.escape(machine.describe_cpu())
    line = re.fullmatch(
        rf"machine: (GPU .+, )?{cpu}, ceilings float32 (\d+) / bfloat16 (\d+) GFLOP/s\n",
        result.stdout,
    )
    assert line, result.stdout
    # Even a 2-core AVX2 CPU convolves at tens of GFLOP/s; under 5 is a broken measurement.
    assert min(int(line.group(2)), int(line.group(3))) >= 5
