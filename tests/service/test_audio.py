"""An audio model served for real: the spoken-words wav2vec2, quantized by SAMP, answered over v2 infer.

tritonclient (HTTP and gRPC) sends held-out clips (voices never trained on) as raw samples and as
prepared input_values; bad tensors get 400 / INVALID_ARGUMENT naming the limit, before any work."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from tests.conftest import samp_publish
from tests.servers import Server, start_server

HELD_OUT = 32


@pytest.fixture(scope="module")
def audio_repo(tmp_path_factory: pytest.TempPathFactory, words_w2v: Path, spoken_data: Path) -> Path:
    """The words model through SAMP (unheard voices only: the test split) with a 1-point budget."""
    return samp_publish(words_w2v, spoken_data / "test.jsonl", tmp_path_factory.mktemp("audiorepo"), "words",
                        tmp_path_factory.mktemp("samp"), max_drop=0.01, mode="static", latency_batches=(32,),
                        max_examples=120)


@pytest.fixture(scope="module")
def audio_server(audio_repo: Path) -> Iterator[Server]:
    running = start_server(audio_repo)
    yield running
    assert running.stop() == 0


@pytest.fixture(scope="module")
def held_out(spoken_data: Path, words_w2v: Path):
    """Unheard voices' clips as a client holds them (float32 samples at 16 kHz, each its own length), their
    label indices, and transformers' feature extractor's input_values for the same clips."""
    from training.audio import feature_extractor, input_values, load_audio
    from training.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(words_w2v)
    records = [json.loads(line) for line in (spoken_data / "test.jsonl").read_text().splitlines()][:HELD_OUT]
    clips = [load_audio(spoken_data / r["audio"], 16000) for r in records]
    prepared = input_values(feature_extractor(checkpoint.preprocessor), clips, 16000).numpy()
    labels = np.array([checkpoint.head.labels.index(r["label"]) for r in records])
    return clips, labels, prepared


def test_samp_measured_every_unit_within_one_point(audio_repo: Path):
    report = json.loads((audio_repo / "words" / "1" / "samp_report.json").read_text())
    units = {u["unit"] for u in report["units"]}
    assert "embeddings" in units and "layer1.ffn_out" in units  # the frame projection is a unit
    candidates = {c["name"]: c for c in report["candidates"]}
    assert candidates[report["chosen"]]["test_metric"] >= candidates["fp32"]["test_metric"] - 0.01
    head = json.loads((audio_repo / "words" / "1" / "head.json").read_text())
    assert head["input_names"] == ["input_values"]
    assert head["audio"] == {"sampling_rate": 16000, "max_samples": 16000, "normalize": True}


def test_tritonclient_http_classifies_unheard_voices(audio_server: Server, held_out):
    clips, labels, prepared = held_out
    client = triton_http.InferenceServerClient(url=audio_server.url.removeprefix("http://"))
    metadata = client.get_model_metadata("words")
    assert {(i["name"], i["datatype"], tuple(i["shape"])) for i in metadata["inputs"]} == {
        ("waveform", "FP32", (-1, -1)), ("input_values", "FP32", (-1, 16000))}
    assert metadata["parameters"]["sampling_rate"] == 16000
    logits, from_values = [], []
    for clip, row in zip(clips, prepared):  # each clip at its own length, as recorded
        tensor = triton_http.InferInput("waveform", [1, len(clip)], "FP32")
        tensor.set_data_from_numpy(clip[None, :], binary_data=True)
        logits.append(client.infer("words", [tensor]).as_numpy("logits")[0])
        values = triton_http.InferInput("input_values", [1, 16000], "FP32")
        values.set_data_from_numpy(row[None, :], binary_data=True)
        from_values.append(client.infer("words", [values]).as_numpy("logits")[0])
    logits = np.stack(logits)
    assert (logits.argmax(-1) == labels).mean() >= 0.5  # chance: 0.05
    # Padding and normalization on the server are the feature extractor's, to the bit (same batch shapes:
    # a graph's float sums may differ in the last bit between batch sizes).
    np.testing.assert_array_equal(logits, np.stack(from_values))


def test_tritonclient_grpc_classifies_unheard_voices(audio_server: Server, held_out):
    clips, _, prepared = held_out
    client = triton_grpc.InferenceServerClient(audio_server.grpc_target)
    tensor = triton_grpc.InferInput("waveform", [len(clips[0])], "FP32")
    tensor.set_data_from_numpy(clips[0])
    one = client.infer("words", [tensor]).as_numpy("logits")
    values = triton_grpc.InferInput("input_values", [1, 16000], "FP32")
    values.set_data_from_numpy(prepared[:1])
    np.testing.assert_array_equal(one, client.infer("words", [values]).as_numpy("logits"))


BAD = [
    ("waveform", np.zeros((1, 16001), np.float32), "1 <= S <= 16000 (1 s): resample and cut"),
    ("waveform", np.zeros((1, 1, 800), np.float32), "takes [S] or [N, S]"),
    ("waveform", np.zeros((1, 800), np.int16), "datatype must be FP32"),
    ("waveform", np.full((1, 800), np.nan, np.float32), "NaN or infinity"),
    ("input_values", np.zeros((1, 800), np.float32), "prepared input_values are [N, 16000]"),
    ("pixel_values", np.zeros((1, 800), np.float32), "give exactly one tensor"),
]


@pytest.mark.parametrize(("name", "array", "message"), BAD, ids=[b[2] for b in BAD])
def test_bad_audio_tensors_get_a_400_naming_the_limit(audio_server: Server, name, array, message):
    client = triton_http.InferenceServerClient(url=audio_server.url.removeprefix("http://"))
    tensor = triton_http.InferInput(name, list(array.shape), {np.float32: "FP32", np.int16: "INT16"}[array.dtype.type])
    tensor.set_data_from_numpy(array, binary_data=True)
    with pytest.raises(InferenceServerException) as error:
        client.infer("words", [tensor])
    assert error.value.status() == "400" and message in error.value.message()


def test_bad_audio_tensors_over_grpc_are_invalid_argument(audio_server: Server):
    client = triton_grpc.InferenceServerClient(audio_server.grpc_target)
    for array, message in ((np.zeros(20000, np.float32), "1 <= S <= 16000"),
                           (np.full(100, np.inf, np.float32), "NaN or infinity")):
        tensor = triton_grpc.InferInput("waveform", list(array.shape), "FP32")
        tensor.set_data_from_numpy(array)
        with pytest.raises(InferenceServerException) as error:
            client.infer("words", [tensor])
        assert error.value.status() == f"StatusCode.{grpc.StatusCode.INVALID_ARGUMENT.name}"
        assert message in error.value.message()
    assert audio_server.http.get("/v2/health/ready").status_code == 200
