"""The ``sampserve`` command.

``sampserve serve ...`` is handed to the server's own entry point (``service.__main__``) before
anything else is imported, so serving never imports torch or the toolkit and takes exactly the
flags of ``python -m service``. Every other subcommand is the typer app in ``sampserve.commands``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

SERVE = "serve"
TRAIN_EXTRA_MODULES = frozenset({"torch", "typer", "rich", "safetensors", "onnx", "onnx_ir", "matplotlib", "gguf",
                                 "sentence_transformers", "transformers"})
"""What the subcommands other than serve import from the train extra (pyproject.toml)."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point (``sampserve`` and ``python -m sampserve.cli``); returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == [SERVE]:
        from service.__main__ import main as serve

        return serve(args[1:], prog=f"sampserve {SERVE}")
    try:
        from sampserve.commands import run
    except ModuleNotFoundError as exc:
        if exc.name not in TRAIN_EXTRA_MODULES:
            raise
        command = f"sampserve {args[0]}" if args else "sampserve"
        print(f"{command}: needs the train extra ({exc.name} is not installed): pip install 'sampserve[train]' "
              "(`sampserve serve` needs only the base install)", file=sys.stderr)
        return 2
    run(args)
    return 0


def __getattr__(name: str) -> Any:
    """``sampserve.cli.app``, the typer app, imported only when asked for (it imports torch)."""
    if name == "app":
        from sampserve.commands import app

        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    sys.exit(main())
