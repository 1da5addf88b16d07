"""Where a plan was measured: the CPU, its INT8 instructions, onnxruntime and the threads.

A SAMP plan is a speed decision (which units in INT8, which INT8 form) measured on one machine. On
another CPU the same graph can rank differently: INT8 pays mainly where the CPU has dot-product
instructions (AVX-512 VNNI, AVX-VNNI, AMX on x86; the dot-product and i8mm extensions on Arm), and
onnxruntime picks its INT8 kernels by those. The quantizer records this next to each plan; the
server compares it with the host it runs on and says so when they differ.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

from pydantic import BaseModel, ConfigDict

CPUINFO = Path("/proc/cpuinfo")
INT8_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "amx_tile",
              "asimddp", "i8mm", "sve")
"""CPU flags that decide which INT8 kernels onnxruntime can use (x86 and Arm names as Linux spells them)."""
INT8_TIERS = (("amx_int8", "AMX"), ("avx512_vnni", "AVX-512 VNNI"), ("avx_vnni", "AVX-VNNI"),
              ("i8mm", "Arm i8mm"), ("asimddp", "Arm dot product"), ("avx512bw", "AVX-512 (no VNNI)"),
              ("avx2", "AVX2 (no VNNI)"))
"""The best INT8 instruction class a CPU has, best first."""


class HostInfo(BaseModel):
    """The machine a measurement was made on (recorded in samp_report.json and manifest.json)."""

    model_config = ConfigDict(extra="ignore")

    cpu: str
    int8_flags: list[str]
    int8_class: str
    """The best INT8 instruction class (INT8_TIERS), the one onnxruntime's kernels depend on."""
    onnxruntime: str
    threads: int
    """onnxruntime intra-op threads the timings ran with."""
    cores: int


def _cpuinfo() -> tuple[str, set[str]]:
    """CPU model name and flags from /proc/cpuinfo (the first processor's), else what platform knows."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        return platform.processor() or platform.machine(), set()
    name, flags = "", set[str]()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model", "CPU part") and not name:
            name = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return name or platform.machine(), flags


def int8_class(flags: set[str] | list[str]) -> str:
    present = set(flags)
    return next((label for flag, label in INT8_TIERS if flag in present), "no INT8 dot-product instructions")


def host_info(threads: int | None = None) -> HostInfo:
    """This machine, as a plan measured here would record it."""
    import onnxruntime

    name, flags = _cpuinfo()
    found = sorted(flags & set(INT8_FLAGS))
    cores = os.cpu_count() or 1
    return HostInfo(cpu=name, int8_flags=found, int8_class=int8_class(found), onnxruntime=onnxruntime.__version__,
                    threads=threads or cores, cores=cores)


def mismatch(recorded: HostInfo | None, host: HostInfo) -> str:
    """Why ``host`` may not get the speed the plan was chosen for ('' when the INT8 class matches, or
    when nothing was recorded: an FP32 version, or one published before plans carried provenance)."""
    if recorded is None:
        return ""
    if recorded.int8_class != host.int8_class:
        return (f"tuned on {recorded.cpu} ({recorded.int8_class}), served on {host.cpu} ({host.int8_class}): "
                "its INT8 choices may be slower here; re-measure with sampserve quantize --retune")
    return ""
