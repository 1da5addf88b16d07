"""docs/cli.md, the CLI reference, generated from the commands' own ``--help`` (typer's for the
toolkit commands, argparse's for ``sampserve serve``), so it cannot drift from them:
``python -m sampserve.cli_reference > docs/cli.md``; tests/test_cli.py checks the file is current."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

WIDTH = 100
HEADER = ("# CLI reference\n\nGenerated from each command's `--help` by `python -m sampserve.cli_reference > "
          "docs/cli.md` (a test fails when it is stale). `sampserve serve` needs only the base install; the other "
          "commands need the train extra (`pip install 'sampserve[train]'`).\n")


@contextmanager
def _fixed_terminal() -> Iterator[None]:
    """Help laid out for a 100-column terminal without colour, whatever this one is."""
    saved = {k: os.environ.get(k) for k in ("COLUMNS", "NO_COLOR", "TERM")}
    os.environ.update({"COLUMNS": str(WIDTH), "NO_COLOR": "1", "TERM": "dumb"})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _commands(group: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every command path under a typer group, depth first, in registration order."""
    for name, command in group.commands.items():
        yield (*path, name)
        if hasattr(command, "commands"):
            yield from _commands(command, (*path, name))


def render() -> str:
    """The whole reference as Markdown."""
    from typer.main import get_command
    from typer.testing import CliRunner

    from sampserve.commands import app
    from service.cli_flags import parser

    sections = [HEADER]
    with _fixed_terminal():
        runner = CliRunner()
        root = get_command(app)
        for path in [(), *_commands(root)]:
            if path == ("serve",):
                continue
            result = runner.invoke(app, [*path, "--help"], prog_name="sampserve", terminal_width=WIDTH,
                                   env={"COLUMNS": str(WIDTH), "NO_COLOR": "1", "TERM": "dumb"})
            if result.exit_code != 0:
                raise RuntimeError(f"sampserve {' '.join(path)} --help failed: {result.output}")
            title = " ".join(("sampserve", *path))
            sections.append(f"## `{title}`\n\n```text\n{_clean(result.output)}\n```\n")
            if path == ():
                serve = parser(prog="sampserve serve").format_help()
                sections.append(f"## `sampserve serve`\n\n```text\n{_clean(serve)}\n```\n")
    return "\n".join(sections)


def _clean(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines())


if __name__ == "__main__":
    sys.stdout.write(render())
