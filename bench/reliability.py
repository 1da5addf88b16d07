"""The reliability table: every attack test against the real server, with what one run measured.

    python bench/reliability.py            # runs tests/service/test_attacks.py, writes docs/reliability.md

Runs ``python -m pytest tests/service/test_attacks.py`` with $SAMPSERVE_RELIABILITY_OUT naming a
temporary file: each test appends what it sent, what it asserts and what it measured there
(``tests.attacks.record``, before its assertions, so a failing run still shows its numbers), and
pytest's JUnit XML gives each test's outcome. docs/reliability.md is wholly generated: change the
tests or this script, not the page.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from bench.docs import machine  # noqa: E402
from tests.attacks import RELIABILITY_OUT  # noqa: E402

TESTS = "tests/service/test_attacks.py"
PYTEST = [sys.executable, "-m", "pytest", TESTS, "-q", "-p", "no:cacheprovider"]
WORST = ("pass", "skipped", "fail", "error")  # a test reported twice (a teardown error) shows the worse

INTRO = """# Reliability

Every protection the server has against hostile or broken clients and files, shown by an attack on
the real server: `sampserve serve` as a subprocess on loopback ports, attacked by the clients of
`tests/attacks.py` from `tests/service/test_attacks.py`. Each test fails if the protection it checks
is removed; the bounds it asserts (the *expected* column) leave room for a shared 2-core machine.
*Measured* is what this run saw, recorded by each test before its assertions; *result* is the
test's outcome (a test with several rows checks several things, and its result covers them all).
This page is generated; change the tests or `bench/reliability.py`, not the page.

What these protections cost in speed is measured with them on, by `python bench/serve.py` (serving
under the model, gRPC against REST, MLServer beside) and `python bench/transport_cost.py` (what
each port's edge costs per call): both in docs/benchmarks.md, with the machine they ran on.
Other tests guard the rest of the contract: malformed JSON and protobuf
(`tests/service/test_hostile_inputs.py`), overload, deadlines and hang-ups
(`tests/service/test_grpc_load.py`, `tests/service/test_lifecycle.py`).
"""


def run_tests(rows_file: Path, junit: Path) -> tuple[int, str]:
    """pytest on the attack tests, its output passed through; (its exit code, its summary line)."""
    env = {**os.environ, RELIABILITY_OUT: str(rows_file), "PYTHONUNBUFFERED": "1"}
    lines: list[str] = []
    with subprocess.Popen([*PYTEST, f"--junitxml={junit}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True) as pytest:
        for line in pytest.stdout:  # type: ignore[union-attr]
            sys.stdout.write(line)
            lines.append(line)
    summary = next((line.strip(" =\n") for line in reversed(lines)
                    if re.search(r"\d+ (passed|failed|error|errors|skipped)\b", line)), "no summary line")
    return pytest.returncode, summary


def outcomes(junit: Path) -> dict[str, tuple[str, str]]:
    """Each test function's outcome (pass, fail, error, skipped) and its message, in the order run."""
    found: dict[str, tuple[str, str]] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome, message = "pass", ""
        for tag, name in (("skipped", "skipped"), ("failure", "fail"), ("error", "error")):
            if (element := case.find(tag)) is not None:
                outcome, message = name, element.get("message", "")
        name = case.get("name", "?")
        if name not in found or WORST.index(outcome) > WORST.index(found[name][0]):
            found[name] = (outcome, message)
    return found


def recorded(rows_file: Path) -> dict[str, list[dict[str, str]]]:
    """The rows the tests recorded, by test function (from the pytest node id each row carries)."""
    rows: dict[str, list[dict[str, str]]] = {}
    if rows_file.exists():
        for line in rows_file.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            rows.setdefault(row["node"].rsplit("::", 1)[-1].split("[", 1)[0], []).append(row)
    return rows


def cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|") or "-"


def table(results: dict[str, tuple[str, str]], rows: dict[str, list[dict[str, str]]]) -> str:
    lines = ["| test | input | expected | measured | result |", "|---|---|---|---|---|"]
    for name in [*results, *(n for n in rows if n not in results)]:
        outcome, message = results.get(name, ("not run", ""))
        result = outcome if outcome in ("pass", "skipped") else f"**{outcome}**"
        why = f": {message[:200]}" if message else ""
        for row in rows.get(name) or [{"test": name.removeprefix("test_"), "attack": "", "expected": "",
                                       "measured": f"nothing recorded ({outcome}{why})"}]:
            lines.append(f"| `{cell(row['test'])}` | {cell(row['attack'])} | {cell(row['expected'])} | "
                         f"{cell(row['measured'])} | {result} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "reliability.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-reliability-") as work:
        rows_file, junit = Path(work) / "rows.jsonl", Path(work) / "junit.xml"
        started = datetime.now(UTC)
        code, summary = run_tests(rows_file, junit)
        if not junit.exists():
            raise SystemExit(f"pytest exited {code} without a JUnit report; {args.out} left as it was")
        results, rows = outcomes(junit), recorded(rows_file)
    page = (f"{INTRO}\n`python bench/reliability.py` (runs `{' '.join(['python', *PYTEST[1:]])}`); "
            f"{machine()}, Python {sys.version.split()[0]}; run {started:%Y-%m-%d %H:%M} UTC.\n\n"
            f"pytest: **{summary}**\n\n{table(results, rows)}\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(page, encoding="utf-8")
    print(f"wrote {args.out} ({summary})")
    if code != 0:
        raise SystemExit(code)


if __name__ == "__main__":
    main()
