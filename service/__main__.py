"""``python -m service``: the server alone, as the images run it.

``sampserve serve`` lands here too (``sampserve.cli.main`` hands it over before importing the
toolkit), so both take the same flags: ``service.cli_flags`` makes one per ``Settings`` field, with
its ``SAMPSERVE_*`` variable. Neither path imports torch or ``training``; the server image has neither.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from service.cli_flags import settings_from_args


def main(argv: Sequence[str] | None = None, prog: str = "python -m service") -> int:
    """Parse the flags (a bad one exits 2 without loading the stack), then serve until SIGTERM."""
    settings = settings_from_args(argv, prog)
    from service.server import run  # after validation: a bad flag answers without loading the stack

    return run(settings)


if __name__ == "__main__":
    sys.exit(main())
