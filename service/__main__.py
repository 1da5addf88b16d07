"""``python -m service``: the server alone, as the images run it.

The ``sampserve`` CLI also holds the training and quantizer commands and imports the toolkit (and so
torch); the server image carries neither, so its entry point is this module. Flags are made from
``Settings``' fields, so they cannot drift from the settings and their ``SAMPSERVE_*`` variables.
"""

from __future__ import annotations

import argparse
import sys

from pydantic import ValidationError

from service.settings import Settings


def parser() -> argparse.ArgumentParser:
    described = argparse.ArgumentParser(prog="python -m service", description="Serve a sampserve model repository "
                                        "over REST (Open Inference Protocol v2, /v1 task endpoints) and gRPC.")
    for name, field in Settings.model_fields.items():
        described.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None, metavar=name.upper(),
                               help=f"{field.description} [env SAMPSERVE_{name.upper()}; default {field.default}]")
    return described


def main(argv: list[str] | None = None) -> int:
    cli = parser()
    given = {name: value for name, value in vars(cli.parse_args(argv)).items() if value is not None}
    try:
        settings = Settings(**given)
    except ValidationError as exc:
        cli.error("; ".join(f"--{'-'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}" for e in exc.errors()))
    from service.server import run  # after validation: a bad flag answers without loading the stack

    return run(settings)


if __name__ == "__main__":
    sys.exit(main())
