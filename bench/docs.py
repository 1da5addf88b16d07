"""Write one benchmark's section of docs/benchmarks.md, replacing its previous run's section."""

from __future__ import annotations

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
