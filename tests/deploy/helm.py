"""The real Helm engine (PyPI's helm-sdkpy, Helm as a shared library) driven the way ``helm lint -f``
and ``helm template -f`` would be, which that library does not offer as such.

- lint: its Lint action takes a chart folder only, so the values files are merged over the chart's
  values.yaml (Helm's own precedence: later files win, maps merge, lists replace) in a copy of the
  chart. It reports a severity and a path per message, without the text.
- render: its Install action against tests/deploy/fakekube.py; Helm renders with the same values
  (schema checked, templates executed) and returns the release manifest, or Helm's error text.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.fakekube import FakeKube

CHART = Path(__file__).resolve().parents[2] / "k8s" / "sampserve"
SEVERITY = {0: "unknown", 1: "info", 2: "warning", 3: "error"}


def merged_values(*values_files: Path) -> dict[str, Any]:
    values = yaml.safe_load((CHART / "values.yaml").read_text()) or {}
    for path in values_files:
        values = _merge(values, yaml.safe_load(Path(path).read_text()) or {})
    return values


def merged_over(over: dict[str, Any], *values_files: Path) -> dict[str, Any]:
    """The chart's values (with ``values_files``) and ``over`` merged on top, as ``--set`` would."""
    return _merge(merged_values(*values_files), over)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def lint(*values_files: Path) -> list[tuple[str, str]]:
    """(severity, path) of each message Helm's linter gives the chart with these values files."""
    import helm_sdkpy

    with tempfile.TemporaryDirectory() as tmp:
        chart = Path(tmp) / CHART.name
        shutil.copytree(CHART, chart)
        (chart / "values.yaml").write_text(yaml.safe_dump(merged_values(*values_files)))
        result = asyncio.run(helm_sdkpy.Lint(helm_sdkpy.Configuration()).run(str(chart)))
    return [(SEVERITY[m["Severity"]], m["Path"]) for m in result.get("Messages") or []]


def render(values: dict[str, Any], release: str = "sampserve") -> list[dict[str, Any]]:
    """The chart's manifests as Helm renders them for an install with ``values``; raises Helm's error."""
    import helm_sdkpy

    with FakeKube() as kube:
        config = helm_sdkpy.Configuration(namespace="default", kubeconfig=kube.kubeconfig)
        result = asyncio.run(helm_sdkpy.Install(config).run(release, str(CHART), values=values, wait=False,
                                                            timeout=60))
    return [doc for doc in yaml.safe_load_all(result["manifest"]) if doc]
