"""The command line as a user meets it: choices from the registries, clear one-line errors."""

import os
import subprocess
import sys

import pytest

from training.components import TARGETS


def _run(*args):
    env = {**os.environ, "COLUMNS": "250"}
    return subprocess.run([sys.executable, "-m", "sampserve.cli", *args], capture_output=True, text=True,
                          timeout=120, check=False, env=env)


def test_components_lists_every_registry():
    done = _run("components")
    assert done.returncode == 0
    for name in ("embeddings", "encoders", "target_embeddings", "decoders", "targets", "pooling"):
        assert name in done.stdout
    assert "contrastive" in done.stdout and "factorized_word" in done.stdout


def test_train_target_choices_come_from_the_registry():
    done = _run("train", "--help")
    assert done.returncode == 0
    for name in TARGETS:
        assert name in done.stdout


def test_user_mistakes_are_one_line_errors_not_tracebacks(tmp_path):
    missing = _run("parity", "--checkpoint", str(tmp_path / "nothing"))
    assert missing.returncode == 2
    assert "is not a sampserve checkpoint" in missing.stderr
    assert "Traceback" not in missing.stdout + missing.stderr
    bad_choice = _run("train", "--data", "x.jsonl", "--out", str(tmp_path / "o"), "--config", "nope")
    assert bad_choice.returncode == 2 and "Traceback" not in bad_choice.stderr
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    bad_data = _run("train", "--data", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "o"),
                    "--config", "tiny-bert")
    assert bad_data.returncode == 2 and "bad.jsonl:1: not valid JSON" in bad_data.stderr


# -- sampserve serve: the server's own flags, without the toolkit ------------------------------


def _help_options(command: list[str]) -> str:
    """``--help``'s option list (after the usage line, which names the program)."""
    env = {**os.environ, "COLUMNS": "120"}
    done = subprocess.run([sys.executable, "-m", *command, "--help"], capture_output=True, text=True, timeout=60,
                          check=False, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout.split("options:", 1)[1]


def test_serve_has_exactly_the_servers_flags_with_description_env_and_default():
    from service.cli_flags import env_var, flag
    from service.settings import Settings

    ours = _help_options(["sampserve.cli", "serve"])
    assert ours == _help_options(["service"])
    flat = " ".join(ours.split())
    for name, field in Settings.model_fields.items():
        assert f"{flag(name)} " in flat and f"env {env_var(name)}" in flat, name
        assert " ".join((field.description or "").split()) in flat, name
    assert "[env SAMPSERVE_REPO; default: model_repo]" in flat
    assert "--strict-readiness {true,false}" in flat and "[env SAMPSERVE_STRICT_READINESS; default: false]" in flat
    assert "--log-format {text,json}" in flat and "default: text]" in flat
    assert "[env SAMPSERVE_PLUGINS, a JSON list; default: unset]" in flat
    assert "[env SAMPSERVE_MAX_BODY_BYTES; default: 4194304]" in flat


def test_sampserve_serve_imports_no_torch():
    """The missing repository makes the server exit 2 at once, after everything it imports."""
    script = ("import sys\n"
              "sys.argv = ['sampserve', 'serve', '--repo', '/nonexistent', '--http-port', '0', '--grpc-port', '0']\n"
              "from sampserve import cli\n"
              "code = cli.main()\n"
              "print('imported:', sorted({'torch', 'training', 'quantizer', 'typer'} & set(sys.modules)))\n"
              "sys.exit(code)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "/nonexistent is not a directory" in done.stdout + done.stderr
    assert "imported: []" in done.stdout


def test_serve_flags_bools_take_values_lists_repeat_and_flags_beat_variables(monkeypatch):
    from service.cli_flags import settings_from_args

    monkeypatch.setenv("SAMPSERVE_HTTP_PORT", "1234")
    monkeypatch.setenv("SAMPSERVE_GRPC_PORT", "4321")
    settings = settings_from_args(["--strict-readiness", "true", "--docs", "false", "--plugins", "a.b",
                                   "--plugins", "c", "--log-format", "json", "--http-port", "0", "--api-key", "k"])
    assert settings.strict_readiness is True and settings.docs is False
    assert settings.plugins == ["a.b", "c"] and settings.log_format == "json"
    assert settings.http_port == 0 and settings.grpc_port == 4321
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "k"
    assert settings_from_args([]).strict_readiness is False


def test_serve_flag_errors_name_the_flag_and_never_echo_the_api_key(capsys):
    from service.cli_flags import settings_from_args

    secret = "s3cret-value"
    for argv, expected in (
        (["--api-key", secret, "--api-key-file", "/k"], "give api_key or api_key_file, not both"),
        (["--api-key", secret, "--http-port", "70000"], "--http-port: Input should be less than or equal to 65535"),
        (["--apikey", secret], "unrecognized arguments: --apikey (and 1 value, not shown)"),
        (["--api-key=" + secret, "--strict-readiness", "maybe"], "--strict-readiness: expected true or false"),
        (["--api", secret], "unrecognized arguments: --api"),  # no abbreviations
    ):
        with pytest.raises(SystemExit) as exited:
            settings_from_args(argv, prog="sampserve serve")
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert expected in err and secret not in err and "Traceback" not in err, err


def test_design_notes_give_every_server_setting_a_reason():
    """settings.py promises that docs/design.md says why each default is what it is."""
    from pathlib import Path

    from service.settings import Settings

    design = (Path(__file__).resolve().parents[1] / "docs" / "design.md").read_text(encoding="utf-8")
    section = design.split("## The server's defaults", 1)[1].split("\n## ", 1)[0]
    missing = [name for name in Settings.model_fields if f"`{name}`" not in section]
    assert not missing, f"docs/design.md, 'The server's defaults', does not mention {missing}"


def test_cli_reference_is_generated_from_the_current_help():
    """docs/cli.md is the commands' own --help; regenerate it when a command or flag changes."""
    from pathlib import Path

    from sampserve.cli_reference import render

    reference = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
    assert reference.read_text(encoding="utf-8") == render(), \
        "docs/cli.md is stale: python -m sampserve.cli_reference > docs/cli.md"
