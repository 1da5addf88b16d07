"""Write one benchmark's section of docs/benchmarks.md, replacing its previous run's section."""

from __future__ import annotations

import os
import platform
from pathlib import Path

INTRO = "# Benchmarks\n\nMeasured on this project's machines; each section names the command that reproduces it.\n"


def write_section(text: str, path: Path, marks: tuple[str, str]) -> None:
    begin, end = marks
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = path.read_text() if path.exists() else INTRO
    section = f"{begin}\n{text}\n{end}"
    if begin in existing:
        before, rest = existing.split(begin, 1)
        existing = before + section + rest.split(end, 1)[1]
    else:
        existing = existing.rstrip() + "\n\n" + section + "\n"
    path.write_text(existing)


def _cpuinfo() -> tuple[str, set[str]]:
    model = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.machine()):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return model, flags


def int8_isa() -> str:
    """The CPU's widest integer-dot-product instruction set: INT8 speed-ups depend on it (AVX-512 VNNI
    has fused INT8 dot products; AVX2 does not)."""
    flags = _cpuinfo()[1]
    return next((name for flag, name in (("avx512_vnni", "AVX-512 VNNI"), ("avx_vnni", "AVX-VNNI"),
                                         ("avx512f", "AVX-512"), ("avx2", "AVX2")) if flag in flags), "no AVX2")


def machine() -> str:
    """The processor, its INT8 instruction set (``int8_isa``) and the cores: every section names them."""
    return f"{_cpuinfo()[0]} ({int8_isa()}), {os.cpu_count()} cores"
