"""The real server as a subprocess on a free loopback port, called with real HTTP clients."""

from __future__ import annotations

import json

import numpy as np
import pytest

from .conftest import _direct, assert_same_rows

def test_health_and_metadata(server):
    assert server.http.get("/v2/health/live").json() == {"live": True}
    assert server.http.get("/v2/health/ready").json() == {"ready": True}
    assert server.http.get("/v2").json()["name"] == "sampserve"
    meta = server.http.get("/v2/models/emb").json()
    assert meta["versions"] == ["1"] and meta["inputs"][0] == {"name": "text", "datatype": "BYTES", "shape": [-1]}
    assert meta["parameters"]["instances"] == 2  # the server's default, as no config.json sets it
    assert server.http.get("/v2/models/emb/versions/1/ready").status_code == 200
    assert server.http.get("/v1/models").json()["data"][0]["id"] == "emb"


def test_tritonclient_http_infer(server, repo):
    import tritonclient.http as triton

    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    assert client.is_server_ready() and client.is_model_ready("emb")
    texts = ["Could not open the file.", "commit your changes before merging"]
    tensor = triton.InferInput("text", [2], "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object))
    result = client.infer("emb", [tensor])
    embeddings = result.as_numpy("embeddings")
    assert embeddings.shape == (2, 64)
    assert_same_rows(embeddings, _direct(repo, "emb", texts))


def test_openai_client_embeddings(server, repo):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused")
    response = client.embeddings.create(model="emb", input=["hello world", "a longer sentence about files"])
    vectors = np.array([d.embedding for d in response.data])
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert_same_rows(vectors, _direct(repo, "emb", ["hello world", "a longer sentence about files"]))
    assert response.usage.prompt_tokens > 4


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_embeddings_take_the_token_ids_tokenize_returns(server):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused")
    text = "could not lock the index file"
    tokenized = server.http.post("/tokenize", json={"model": "emb", "prompt": text, "return_token_strs": True}).json()
    ids = tokenized["tokens"]
    assert tokenized["count"] == len(ids) and tokenized["max_model_len"] == 128
    assert tokenized["token_strs"][0] == "[CLS]" and tokenized["token_strs"][-1] == "[SEP]"
    assert server.http.post("/detokenize", json={"model": "emb", "tokens": ids}).json()["prompt"] == (
        f"[CLS] {text} [SEP]")
    plain = server.http.post("/tokenize", json={"model": "emb", "prompt": text, "add_special_tokens": False}).json()
    assert plain["tokens"] == ids[1:-1]
    by_text = np.array(client.embeddings.create(model="emb", input=text).data[0].embedding)
    # the openai client asks for base64 and decodes it; ids as one list (one input) and as a list of lists
    one = np.array(client.embeddings.create(model="emb", input=ids).data[0].embedding)
    rows = client.embeddings.create(model="emb", input=[ids, ids[:3] + ids[-1:]]).data
    assert len(rows) == 2 and _cosine(one, by_text) > 0.9999 and _cosine(np.array(rows[0].embedding), by_text) > 0.9999
    assert _cosine(np.array(rows[1].embedding), by_text) < 0.99  # a different input, a different vector


def test_embeddings_dimensions_are_the_first_components_normalized_again(server):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused")
    full = np.array(client.embeddings.create(model="emb", input="merge the branches").data[0].embedding)
    short = np.array(client.embeddings.create(model="emb", input="merge the branches", dimensions=16,
                                              user="someone").data[0].embedding)
    assert short.shape == (16,) and np.linalg.norm(short) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(short, full[:16] / np.linalg.norm(full[:16]), atol=1e-5)


@pytest.mark.parametrize(("body", "needle"), [
    ({"input": "x", "dimensions": 65}, "dimensions: 65; model 'emb' gives 1 to 64"),
    ({"input": "x", "dimensions": 0}, "dimensions: 0"),
    ({"input": [[101, 100277, 102]]}, "outside this model's vocabulary (0..30521)"),  # a tiktoken id
    ({"input": [[101, -1]]}, "token id -1 is outside"),
    ({"input": [[101, 2023], []]}, "non-empty lists of token ids"),
    ({"input": [101, "word"]}, "a list of token ids (integers)"),
    ({"input": [[101, True]]}, "non-empty lists of token ids"),
    ({"input": [list(range(1000, 1200))]}, "200 tokens; the model takes at most 128"),
])
def test_bad_token_ids_and_dimensions_are_400_before_any_work(server, body, needle):
    response = server.http.post("/v1/embeddings", json={"model": "emb", **body})
    assert response.status_code == 400 and needle in response.json()["error"]["message"], response.text


def test_tiktoken_ids_get_a_hint_and_langchain_works_with_its_documented_setting(server):
    message = server.http.post("/v1/embeddings", json={"model": "emb", "input": [[15339, 1917, 100000]]}).json()
    assert "check_embedding_ctx_length=False" in message["error"]["message"]
    langchain = pytest.importorskip("langchain_openai", reason="langchain-openai does not install here")
    embedder = langchain.OpenAIEmbeddings(model="emb", base_url=server.url + "/v1", api_key="unused",
                                          check_embedding_ctx_length=False)
    vectors = np.array(embedder.embed_documents(["open the file", "close the file"]))
    query = np.array(embedder.embed_query("open the file"))
    assert vectors.shape == (2, 64) and _cosine(vectors[0], query) > 0.9999


def test_rerank_speaks_cohere_and_jina(server):
    docs = ["the database is locked", "cannot push to remote", {"text": "the database is locked!"}]
    for path in ("/v1/rerank", "/v2/rerank", "/rerank"):
        answer = server.http.post(path, json={"model": "emb", "query": "the database is locked", "documents": docs,
                                              "top_n": 2, "return_documents": True}).json()
        assert [r["index"] for r in answer["results"]] == [0, 2]
        assert answer["results"][0]["document"] == {"text": "the database is locked"}
        assert answer["results"][0]["relevance_score"] >= answer["results"][1]["relevance_score"]
        assert answer["usage"]["total_tokens"] > 0 and answer["id"].startswith("rerank-")
    bare = server.http.post("/v1/rerank", json={"model": "emb", "query": "q", "documents": ["a", "b"]}).json()
    assert len(bare["results"]) == 2 and "document" not in bare["results"][0]
    cohere = pytest.importorskip("cohere", reason="the cohere client does not install here")
    client = cohere.ClientV2(api_key="unused", base_url=server.url)
    ranked = client.rerank(model="emb", query="the database is locked", documents=[
        "cannot push to remote", "the database is locked"], top_n=1)
    assert ranked.results[0].index == 1 and ranked.results[0].relevance_score > 0.99


def test_task_endpoints(server):
    docs = ["the database is locked", "cannot push to remote", "the database is locked!"]
    ranked = server.http.post("/v1/rerank", json={"model": "emb", "query": "the database is locked",
                                                  "documents": docs}).json()["results"]
    assert ranked[0]["index"] == 0 and ranked[0]["relevance_score"] == pytest.approx(1.0, abs=1e-5)
    scores = server.http.post("/v1/similarity", json={"model": "emb", "pairs": [["a b", "a b"], ["a b", "x"]]}).json()
    assert scores["scores"][0] == pytest.approx(1.0, abs=1e-5) and scores["scores"][1] < 1.0
    out = server.http.post("/v1/classify", json={"model": "topics", "texts": ["failed to lock the ref"],
                                                 "top_k": 3}).json()
    assert len(out["results"][0]["top_k"]) == 3
    assert sum(item["score"] for item in out["results"][0]["top_k"]) <= 1.0 + 1e-6


@pytest.mark.parametrize(("path", "body", "status", "needle"), [
    ("/v2/models/nope/infer", {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["x"]}]},
     404, "not in the repository"),
    ("/v2/models/emb/infer", {"inputs": []}, 400, "'text'"),
    ("/v2/models/emb/infer", {"inputs": [{"name": "text", "shape": [1], "datatype": "FP32", "data": [1.0]}]},
     400, "BYTES"),
    ("/v2/models/emb/infer", {"inputs": [{"name": "text", "shape": [3], "datatype": "BYTES", "data": ["x"]}]},
     400, "holds 3 elements"),
    ("/v2/models/emb/infer", {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [5]}]},
     400, "strings"),
    ("/v2/models/emb/infer", {"inputs": None}, 400, "inputs"),
    ("/v1/embeddings", {"model": "emb", "input": " ".join(["word"] * 400)}, 400, "at most 128"),
    ("/v1/embeddings", {"model": "emb", "input": []}, 400, "at least one"),
    ("/v1/embeddings", {"model": "topics", "input": "x"}, 400, "not matching"),
    ("/v1/classify", {"model": "topics", "texts": ["x"] * 300}, 400, "at most 128"),
])
def test_bad_input_is_a_clear_client_error(server, path, body, status, needle):
    response = server.http.post(path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    message = error["message"] if isinstance(error, dict) else error
    assert needle in message


def test_truncation_is_explicit(server):
    long_text = " ".join(["word"] * 400)
    response = server.http.post("/v1/embeddings", json={"model": "emb", "input": long_text, "truncate": True})
    assert response.status_code == 200 and len(response.json()["data"][0]["embedding"]) == 64


def test_malformed_json_is_400(server):
    response = server.http.post("/v2/models/emb/infer", content=b"{not json",
                                headers={"content-type": "application/json"})
    assert response.status_code == 400 and "error" in response.json()


def test_metrics_are_exported(server):
    server.http.post("/v1/embeddings", json={"model": "emb", "input": "count me"})
    text = server.http.get("/metrics").text
    for name in ("sampserve_requests_total", "sampserve_request_duration_seconds_bucket", "sampserve_batch_size",
                 "sampserve_queue_duration_seconds", "sampserve_compute_duration_seconds", "sampserve_queue_depth",
                 "sampserve_tokens_total", "sampserve_model_version_loaded"):
        assert name in text, name
    assert 'sampserve_requests_total{endpoint="embeddings",model="emb",outcome="ok",version="1"}' in text


def _binary_body(texts: list[bytes]) -> tuple[bytes, dict]:
    blob = b"".join(len(t).to_bytes(4, "little") + t for t in texts)
    header = json.dumps({"inputs": [{"name": "text", "shape": [len(texts)], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(blob)}}]}).encode()
    return header + blob, {"Inference-Header-Content-Length": str(len(header)),
                           "content-type": "application/octet-stream"}


def test_binary_extension_rejects_bad_bytes(server):
    body, headers = _binary_body([b"fine", b"\xff\xfe not utf-8"])
    response = server.http.post("/v2/models/emb/infer", content=body, headers=headers)
    assert response.status_code == 400 and "not UTF-8" in response.json()["error"]
    body, headers = _binary_body([b"fine"])
    headers["Inference-Header-Content-Length"] = str(len(body) + 10)
    assert server.http.post("/v2/models/emb/infer", content=body, headers=headers).status_code == 400


def test_oversized_body_is_413(server):
    huge = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["x" * (5 * 1024 * 1024)]}]}
    response = server.http.post("/v2/models/emb/infer", json=huge)
    assert response.status_code == 413 and "limit" in response.json()["error"]
