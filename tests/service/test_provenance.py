"""Provenance: the machine a plan was tuned on, read from this host, compared on load, and shown in the
model's metadata (with a logged warning) when the INT8 instruction class differs."""

from __future__ import annotations

import json
from pathlib import Path

from service.provenance import INT8_TIERS, HostInfo, host_info, int8_class, mismatch
from service.repository import publish
from tests.servers import start_server


def test_this_host_is_described() -> None:
    here = host_info(3)
    assert here.cpu and here.threads == 3 and here.cores >= 1 and here.onnxruntime
    assert here.int8_class == int8_class(here.int8_flags)


def test_the_best_int8_class_wins_and_only_a_different_class_warns() -> None:
    assert int8_class(["avx2", "avx512f", "avx512bw", "avx512_vnni"]) == "AVX-512 VNNI"
    assert int8_class(["avx2", "avx_vnni", "avx512_vnni", "amx_int8", "amx_tile"]) == "AMX"
    assert int8_class(["avx2"]) == "AVX2 (no VNNI)"
    assert int8_class([]) == "no INT8 dot-product instructions"
    here = host_info()
    assert mismatch(here.model_copy(update={"threads": 99, "cpu": "another of the same kind"}), here) == ""
    assert mismatch(None, here) == ""  # FP32 versions and plans from before provenance
    other = _other_class(here)
    warning = mismatch(other, here)
    assert other.int8_class in warning and here.int8_class in warning and "--retune" in warning


def _other_class(here: HostInfo) -> HostInfo:
    label = next(label for _, label in INT8_TIERS if label != here.int8_class)
    return here.model_copy(update={"cpu": "Some Other CPU", "int8_class": label})


def test_a_plan_tuned_on_another_instruction_set_is_served_with_a_warning(private_repo: Path) -> None:
    source = private_repo / "emb" / "1"
    manifest = json.loads((source / "manifest.json").read_text())
    recorded = HostInfo.model_validate(manifest["metadata"]["provenance"])  # what SAMP wrote here
    assert recorded.int8_class == host_info().int8_class
    foreign = _other_class(recorded)
    files = {p.name: p for p in source.iterdir() if p.name != "manifest.json"}
    publish(private_repo / "emb", files, {**manifest["metadata"], "provenance": foreign.model_dump()})
    config = private_repo / "emb" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "version_policy": {"all": True}}))
    server = start_server(private_repo)
    try:
        latest = server.http.get("/v2/models/emb").json()["parameters"]
        assert "Some Other CPU" in latest["tuned_on"] and foreign.int8_class in latest["tuned_on"]
        assert "tuned on Some Other CPU" in latest["tuning_warning"]
        first = server.http.get("/v2/models/emb/versions/1").json()["parameters"]  # tuned here: no warning
        assert first["tuning_warning"] == "" and recorded.cpu in first["tuned_on"]
        answer = server.http.post("/v1/embeddings", json={"model": "emb", "input": ["still served"]})
        assert answer.status_code == 200  # a warning, not a refusal
    finally:
        assert server.stop() == 0
    assert "emb/2: tuned on Some Other CPU" in server.output()
