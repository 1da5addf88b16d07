"""The command line as a user meets it: choices from the registries, clear one-line errors."""

import os
import subprocess
import sys

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
