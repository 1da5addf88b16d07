"""The server's command-line flags, made from ``service.settings.Settings``.

``sampserve serve`` and ``python -m service`` both parse with ``parser()``, so every settings field
is a flag under both, with the field's description, its ``SAMPSERVE_*`` variable and its default in
``--help``; none of them can drift from the settings. Stdlib and pydantic only: the server image has
no torch, and ``sampserve serve`` must not pay for importing it.

How a field becomes a flag (``http_port`` -> ``--http-port``):

- bool: takes a value, ``--strict-readiness true`` / ``false`` (as its variable does);
- list: the flag repeats, ``--plugins a --plugins b`` (the variable holds a JSON list);
- Literal: the value is one of its choices;
- dict: a JSON object;
- anything else: a string that the settings validate, so a flag's limits are the field's.

A flag given wins over its variable. Errors name the flag or the variable, and never echo a value:
``--api-key`` carries a secret.
"""

from __future__ import annotations

import argparse
import json
import textwrap
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, NoReturn, Union, get_args, get_origin

from pydantic import SecretStr, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import SettingsError

from service.settings import Settings

ENV_PREFIX = "SAMPSERVE_"
DESCRIPTION = ("Serve a sampserve model repository over REST (Open Inference Protocol v2, /v1 task endpoints) "
               "and gRPC.")
EPILOG = ("Every flag has a SAMPSERVE_* environment variable; a flag given overrides its variable. "
          "docs/design.md says why each default is what it is.")
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_var(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _without_none(annotation: Any) -> Any:
    """``X | None`` -> ``X`` (a field that may be unset still takes an X on the command line)."""
    if get_origin(annotation) in (Union, types.UnionType):
        rest = [arg for arg in get_args(annotation) if arg is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return annotation


def _boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"expected a JSON object: {exc.msg} at column {exc.colno}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def _shown(value: Any) -> str:
    """A default as a user would type it."""
    if value is None or value == [] or value == {}:
        return "unset"
    if isinstance(value, dict):
        return json.dumps(value)
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, SecretStr):
        return "(hidden)"
    if isinstance(value, list):
        return " ".join(map(_shown, value))
    return str(value)


def _help(name: str, field: FieldInfo, repeated: bool) -> str:
    default = _shown(field.get_default(call_default_factory=True))
    description = (field.description or "") + (" Repeat the flag for several." if repeated else "")
    env = f"env {env_var(name)}" + (", a JSON list" if repeated else "")
    return f"{description} [{env}; default: {default}]".replace("%", "%%")  # argparse %-formats help strings


def _metavar(annotation: Any) -> str:
    """What the value is, in one word (the flag names the field already)."""
    if get_origin(annotation) is list:
        (annotation,) = get_args(annotation) or (str,)
    names = {int: "INT", float: "FLOAT", Path: "PATH", SecretStr: "SECRET"}
    return names.get(annotation, "TEXT")


def _add(parser: argparse.ArgumentParser, name: str, field: FieldInfo) -> None:
    annotation = _without_none(field.annotation)
    options: dict[str, Any] = {"dest": name, "default": None}
    repeated = get_origin(annotation) is list
    if annotation is bool:
        options.update(type=_boolean, metavar="{true,false}")
    elif repeated:
        options.update(action="append", metavar=_metavar(annotation))
    elif get_origin(annotation) is Literal:
        options.update(choices=[str(choice) for choice in get_args(annotation)])
    elif get_origin(annotation) is dict:  # a mapping is given as JSON, as its variable is
        options.update(type=_json_object, metavar="JSON")
    else:  # validated by Settings itself, so a flag's bounds are the field's
        options.update(metavar=_metavar(annotation))
    parser.add_argument(flag(name), help=_help(name, field, repeated), **options)


class _Formatter(argparse.HelpFormatter):
    """Wraps help text without splitting a flag or a name at its hyphens (``--strict-readiness``)."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


class SettingsParser(argparse.ArgumentParser):
    """An ArgumentParser that names unknown flags without echoing the values that follow them (a
    mistyped ``--api-key`` is followed by a secret)."""

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            flags = [token.split("=", 1)[0] for token in unknown if token.startswith("-")]
            values = len(unknown) - len(flags)
            self.error("unrecognized arguments: " + (" ".join(flags) or "(none are flags)")
                       + (f" (and {values} value{'s' * (values > 1)}, not shown)" if values else ""))
        return parsed

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parser(prog: str = "python -m service") -> argparse.ArgumentParser:
    """The server's flags: one per ``Settings`` field, in the fields' order."""
    parsed = SettingsParser(prog=prog, usage="%(prog)s [--FLAG VALUE ...]", description=DESCRIPTION, epilog=EPILOG,
                            formatter_class=_Formatter, allow_abbrev=False)
    for name, field in Settings.model_fields.items():
        _add(parsed, name, field)
    return parsed


def describe_error(exc: ValidationError, given: set[str]) -> str:
    """One clause per problem, naming the flag (or the variable it came from); never the value."""
    parts = []
    for error in exc.errors(include_input=False, include_url=False):
        loc = error["loc"]
        message = str(error["msg"]).removeprefix("Value error, ")
        if loc and loc[0] in Settings.model_fields:
            name = str(loc[0])
            where = flag(name) if name in given else env_var(name)
            where += "".join(f"[{part}]" for part in loc[1:])
            parts.append(f"{where}: {message}")
        else:
            parts.append(message)
    return "; ".join(parts)


def settings_from_args(argv: Sequence[str] | None = None, prog: str = "python -m service") -> Settings:
    """Parse ``argv`` (default: ``sys.argv[1:]``) over the environment; a bad flag or variable exits 2
    with one line naming it."""
    cli = parser(prog)
    given = {name: value for name, value in vars(cli.parse_args(argv)).items() if value is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        cli.error(describe_error(exc, set(given)))
    except SettingsError as exc:  # a variable that is not valid JSON where the field needs it (a list)
        cli.error(str(exc))


__all__ = ["describe_error", "env_var", "flag", "parser", "settings_from_args"]

