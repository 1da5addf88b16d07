"""The model repository format: atomic publish (crash-safe, concurrent), verify, config loading."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.repository import (
    HEAD_FILE,
    MANIFEST_FILE,
    MODEL_CONFIG_FILE,
    ONNX_FILE,
    TEMP_PREFIX,
    TOKENIZER_FILE,
    BatchingConfig,
    HeadError,
    HeadMeta,
    ManifestError,
    ModelConfigError,
    RepoModelConfig,
    VersionPolicy,
    list_versions,
    load_head,
    load_model_config,
    next_version,
    publish,
    remove_stale_temp,
    verify,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 30.0


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    path = tmp_path / "model_repo" / "minilm"
    path.mkdir(parents=True)
    return path


def _publish_sample(model_dir: Path, tmp_path: Path, tag: str = "a") -> Path:
    onnx = tmp_path / f"model-{tag}.onnx"
    onnx.write_bytes(os.urandom(3 * (1 << 20) + 17))  # bigger than one copy chunk
    files = {ONNX_FILE: onnx, TOKENIZER_FILE: b'{"tok": 1}', f"assets/{HEAD_FILE}": b'{"labels": ["x"]}'}
    return publish(model_dir, files, metadata={"tag": tag})


def _temp_dirs(model_dir: Path) -> list[Path]:
    return sorted(p for p in model_dir.iterdir() if p.name.startswith(TEMP_PREFIX))


def _numbered(model_dir: Path) -> list[str]:
    return sorted(p.name for p in model_dir.iterdir() if p.name.isdigit())


# ---------------------------------------------------------------------------------------------
# publish / verify


def test_publish_twice_gives_versions_1_and_2(model_dir: Path, tmp_path: Path) -> None:
    first = _publish_sample(model_dir, tmp_path, "a")
    second = _publish_sample(model_dir, tmp_path, "b")

    assert (first, second) == (model_dir / "1", model_dir / "2")
    assert list_versions(model_dir) == [1, 2]
    assert next_version(model_dir) == 3
    assert _temp_dirs(model_dir) == []
    for n, path in ((1, first), (2, second)):
        manifest = verify(path)
        assert manifest.version == n
        assert manifest.metadata == {"tag": "ab"[n - 1]}
        assert set(manifest.files) == {ONNX_FILE, TOKENIZER_FILE, f"assets/{HEAD_FILE}"}
        for name, entry in manifest.files.items():
            content = (path / name).read_bytes()
            assert entry.sha256 == hashlib.sha256(content).hexdigest()
            assert entry.bytes == len(content)
    onnx_a = (tmp_path / "model-a.onnx").read_bytes()
    assert (first / ONNX_FILE).read_bytes() == onnx_a
    raw = json.loads((second / MANIFEST_FILE).read_text())
    assert set(raw) == {"version", "created", "files", "metadata"}


def test_list_versions_ignores_temp_files_and_non_numeric(model_dir: Path) -> None:
    for name in ("1", "3", "10", ".tmp-abc", "latest", "01", "0", "2x"):
        (model_dir / name).mkdir()
    (model_dir / "2").write_text("a file, not a version")
    (model_dir / MODEL_CONFIG_FILE).write_text("{}")

    assert list_versions(model_dir) == [1, 3, 10]
    assert next_version(model_dir) == 11


def test_publish_skips_a_number_taken_by_a_stray_file(model_dir: Path) -> None:
    (model_dir / "1").write_text("not a directory")  # ignored by list_versions, but rename onto it fails

    path = publish(model_dir, {TOKENIZER_FILE: b"{}"})

    assert path == model_dir / "2"
    assert verify(path).version == 2  # the manifest was renumbered along with the retry


@pytest.mark.parametrize(
    "name",
    ["../evil.onnx", "/etc/passwd", "a/../../b", "a/b/c.json", "", ".", "./x", "a//b", "a\\b", "C:x", MANIFEST_FILE],
)
def test_publish_rejects_bad_file_names(model_dir: Path, name: str) -> None:
    with pytest.raises(ValueError, match=r"file name|manifest\.json"):
        publish(model_dir, {TOKENIZER_FILE: b"{}", name: b"x"})
    assert list(model_dir.iterdir()) == []
    assert not (model_dir.parent / "evil.onnx").exists()


def test_failed_publish_leaves_nothing(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        publish(model_dir, {TOKENIZER_FILE: b"{}", ONNX_FILE: tmp_path / "does-not-exist.onnx"})
    with pytest.raises(TypeError):
        publish(model_dir, {ONNX_FILE: "a str is neither a Path nor bytes"})  # type: ignore[dict-item]
    assert list(model_dir.iterdir()) == []
    assert publish(model_dir, {ONNX_FILE: b"ok"}) == model_dir / "1"


def _tamper_byte(version: Path) -> str:
    path = version / ONNX_FILE
    data = bytearray(path.read_bytes())
    data[1000] ^= 0xFF
    path.write_bytes(bytes(data))
    return rf"{ONNX_FILE}: sha256 .* does not match"


def _tamper_size(version: Path) -> str:
    with open(version / TOKENIZER_FILE, "ab") as f:
        f.write(b" ")
    return rf"{TOKENIZER_FILE}: size 11 bytes, manifest.json says 10"


def _tamper_delete(version: Path) -> str:
    (version / "assets" / HEAD_FILE).unlink()
    return rf"assets/{HEAD_FILE}: listed in manifest.json but missing"


def _tamper_extra(version: Path) -> str:
    (version / "assets" / "extra.bin").write_bytes(b"injected")
    return r"assets/extra.bin: not listed in manifest.json"


def _tamper_version(version: Path) -> str:
    path = version / MANIFEST_FILE
    raw = json.loads(path.read_text())
    raw["version"] = 7
    path.write_text(json.dumps(raw))
    return r"version 7 does not match folder name '1'"


def _tamper_manifest_json(version: Path) -> str:
    (version / MANIFEST_FILE).write_text("{not json")
    return r"manifest.json: invalid JSON at line 1"


def _tamper_manifest_field(version: Path) -> str:
    path = version / MANIFEST_FILE
    raw = json.loads(path.read_text())
    raw["files"][ONNX_FILE]["sha256"] = "xyz"
    path.write_text(json.dumps(raw))
    return rf"manifest.json: files.{ONNX_FILE}.sha256: String should match pattern"


def _tamper_manifest_path(version: Path) -> str:
    path = version / MANIFEST_FILE
    raw = json.loads(path.read_text())
    raw["files"]["../outside.bin"] = raw["files"].pop(TOKENIZER_FILE)
    path.write_text(json.dumps(raw))
    return r"bad file name: .*'\.\./outside\.bin'"


def _tamper_missing_manifest(version: Path) -> str:
    (version / MANIFEST_FILE).unlink()
    return r"manifest.json: missing"


def _tamper_symlink(version: Path) -> str:
    target = version / TOKENIZER_FILE
    outside = version.parent / "outside.json"
    outside.write_bytes(target.read_bytes())
    target.unlink()
    target.symlink_to(outside)
    return rf"{TOKENIZER_FILE}: not a regular file"


@pytest.mark.parametrize(
    "tamper",
    [
        _tamper_byte,
        _tamper_size,
        _tamper_delete,
        _tamper_extra,
        _tamper_version,
        _tamper_manifest_json,
        _tamper_manifest_field,
        _tamper_manifest_path,
        _tamper_missing_manifest,
        _tamper_symlink,
    ],
)
def test_verify_names_what_was_tampered_with(model_dir: Path, tmp_path: Path, tamper) -> None:
    version = publish(
        model_dir,
        {ONNX_FILE: os.urandom(4096), TOKENIZER_FILE: b'{"tok": 1}', f"assets/{HEAD_FILE}": b"{}"},
    )
    verify(version)
    expected = tamper(version)
    with pytest.raises(ManifestError, match=expected):
        verify(version)


def test_verify_reports_every_problem_at_once(model_dir: Path) -> None:
    version = publish(model_dir, {ONNX_FILE: b"onnx", TOKENIZER_FILE: b"{}"})
    (version / ONNX_FILE).unlink()
    (version / "stray.txt").write_text("x")
    with pytest.raises(ManifestError) as info:
        verify(version)
    assert f"{ONNX_FILE}: listed in manifest.json but missing" in str(info.value)
    assert "stray.txt: not listed in manifest.json" in str(info.value)


# ---------------------------------------------------------------------------------------------
# crash atomicity and concurrency, with real processes

_CRASH_SCRIPT = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from service.repository import publish
publish(Path(sys.argv[2]), {"head.json": b"{}", "model.onnx": Path(sys.argv[3])})
print("published", flush=True)  # never reached: the FIFO is never closed by the test
"""


def _open_fifo_writer(fifo: Path, proc: subprocess.Popen) -> int:
    """Open the FIFO for writing once the publisher has opened it for reading (never blocks)."""
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:
            if e.errno != errno.ENXIO:  # ENXIO: no reader yet
                raise
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"publisher never opened the FIFO (rc={proc.returncode}):\n{out}\n{err}")
        time.sleep(0.01)


def _wait_for_partial_write(model_dir: Path, proc: subprocess.Popen) -> Path:
    """Wait until the publisher's temp dir holds part of model.onnx."""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        for tmp in _temp_dirs(model_dir):
            onnx = tmp / ONNX_FILE
            if onnx.exists() and onnx.stat().st_size > 0:
                return tmp
        time.sleep(0.01)
    proc.kill()
    out, err = proc.communicate()
    pytest.fail(f"publisher never started writing model.onnx (rc={proc.returncode}):\n{out}\n{err}")


def test_sigkill_mid_write_leaves_no_version(model_dir: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "slow-source.onnx"
    os.mkfifo(fifo)
    proc = subprocess.Popen(
        [sys.executable, "-c", _CRASH_SCRIPT, str(REPO_ROOT), str(model_dir), str(fifo)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    fd = _open_fifo_writer(fifo, proc)
    try:
        os.write(fd, b"\x08ONNX" * 8000)  # 40 KB: more than the writer's buffer, less than the pipe's
        tmp = _wait_for_partial_write(model_dir, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=TIMEOUT_S)
    finally:
        os.close(fd)
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL

    assert list_versions(model_dir) == []
    assert _numbered(model_dir) == []
    assert _temp_dirs(model_dir) == [tmp]
    assert not (tmp / MANIFEST_FILE).exists()
    assert (tmp / HEAD_FILE).read_bytes() == b"{}"

    assert remove_stale_temp(model_dir) == []  # too young for the default threshold
    assert remove_stale_temp(model_dir, older_than_s=0) == [tmp]
    assert _temp_dirs(model_dir) == []

    version = publish(model_dir, {ONNX_FILE: b"onnx", HEAD_FILE: b"{}"})
    assert version == model_dir / "1"
    verify(version)


def test_remove_stale_temp_respects_age(model_dir: Path) -> None:
    old, young = model_dir / f"{TEMP_PREFIX}old", model_dir / f"{TEMP_PREFIX}young"
    for tmp in (old, young):
        tmp.mkdir()
        (tmp / ONNX_FILE).write_bytes(b"partial")
    long_ago = time.time() - 7200
    for path in (old / ONNX_FILE, old):
        os.utime(path, (long_ago, long_ago))
    (model_dir / "1").mkdir()

    assert remove_stale_temp(model_dir, older_than_s=3600) == [old]
    assert sorted(p.name for p in model_dir.iterdir()) == sorted(["1", young.name])


_PUBLISHER_SCRIPT = """
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from service.repository import publish
model_dir, go, tag = Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
while not go.exists():
    time.sleep(0.001)
for i in range(5):
    publish(model_dir, {"model.onnx": f"{tag}-{i}".encode() * 5000, "head.json": b"{}"}, {"tag": tag, "i": i})
"""


def _publish_concurrently_with_processes(model_dir: Path, tmp_path: Path) -> None:
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _PUBLISHER_SCRIPT, str(REPO_ROOT), str(model_dir), str(go), tag],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for tag in ("p0", "p1")
    ]
    time.sleep(0.5)  # let both import and reach the start line
    go.touch()
    for proc in procs:
        _out, err = proc.communicate(timeout=TIMEOUT_S)
        assert proc.returncode == 0, err


def _publish_concurrently_with_threads(model_dir: Path, tmp_path: Path) -> None:
    start = threading.Barrier(2)
    errors: list[BaseException] = []

    def worker(tag: str) -> None:
        try:
            start.wait()
            for i in range(5):
                payload = f"{tag}-{i}".encode() * 5000
                publish(model_dir, {ONNX_FILE: payload, HEAD_FILE: b"{}"}, {"tag": tag, "i": i})
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(tag,)) for tag in ("t0", "t1")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT_S)
    assert errors == []


@pytest.mark.parametrize("how", ["threads", "processes"])
def test_concurrent_publishers_lose_nothing(model_dir: Path, tmp_path: Path, how: str) -> None:
    if how == "threads":
        _publish_concurrently_with_threads(model_dir, tmp_path)
    else:
        _publish_concurrently_with_processes(model_dir, tmp_path)

    assert list_versions(model_dir) == list(range(1, 11))
    assert _temp_dirs(model_dir) == []
    published = set()
    for n in range(1, 11):
        manifest = verify(model_dir / str(n))
        assert manifest.version == n
        published.add((manifest.metadata["tag"], manifest.metadata["i"]))
        tag, i = manifest.metadata["tag"], manifest.metadata["i"]
        assert (model_dir / str(n) / ONNX_FILE).read_bytes() == f"{tag}-{i}".encode() * 5000
    assert len(published) == 10


# ---------------------------------------------------------------------------------------------
# VersionPolicy and config.json


def test_version_policy_selects() -> None:
    available = [3, 1, 7, 2]
    assert VersionPolicy().latest == 1
    assert VersionPolicy().select(available) == [7]
    assert VersionPolicy(latest=2).select(available) == [3, 7]
    assert VersionPolicy(latest=10).select(available) == [1, 2, 3, 7]
    assert VersionPolicy(specific=[7, 2, 5]).select(available) == [2, 7]
    assert VersionPolicy(all=True).select(available) == [1, 2, 3, 7]
    assert VersionPolicy.model_validate({}).select([]) == []


@pytest.mark.parametrize(
    "raw",
    [
        {"latest": 2, "all": True},
        {"latest": 1, "specific": [1]},
        {"specific": [1], "all": True},
        {"all": False},
        {"latest": 0},
        {"specific": []},
        {"specific": [0]},
        {"newest": 1},
    ],
)
def test_version_policy_rejects(raw: dict) -> None:
    with pytest.raises(ValidationError):
        VersionPolicy.model_validate(raw)


def test_batching_config_bounds() -> None:
    assert BatchingConfig() == BatchingConfig(
        max_batch_size=32, max_batch_tokens=8192, max_queue_size=256, instances=None
    )
    # no queue delay: the batcher never waits while a runtime is free, so there is nothing to set
    for bad in ({"max_batch_size": 0}, {"max_batch_size": 1025}, {"max_queue_delay_ms": 2.0},
                {"max_batch_tokens": 0}, {"max_queue_size": 0}, {"instances": 0}, {"instances": 17}):
        with pytest.raises(ValidationError):
            BatchingConfig.model_validate(bad)


def _write_config(model_dir: Path, raw: dict | str) -> Path:
    path = model_dir / MODEL_CONFIG_FILE
    path.write_text(raw if isinstance(raw, str) else json.dumps(raw))
    return path


def test_load_model_config_valid(model_dir: Path) -> None:
    _write_config(
        model_dir,
        {
            "name": "minilm",
            "task": "matching",
            "source": "bundled all-MiniLM-L6-v2",
            "batching": {"max_batch_size": 64, "max_batch_tokens": 4096},
            "version_policy": {"specific": [1, 3]},
            "max_length": 256,
        },
    )
    config = load_model_config(model_dir)
    assert isinstance(config, RepoModelConfig)
    assert config.task == "matching"
    assert config.max_drop == 0.01
    assert config.batching.max_batch_size == 64 and config.batching.max_queue_size == 256
    assert config.runtime == "onnxruntime"
    assert config.version_policy.select([1, 2, 3]) == [1, 3]
    assert config.max_length == 256

    _write_config(model_dir, {"name": "minilm", "task": "classification", "source": "x"})
    config = load_model_config(model_dir)
    assert config.version_policy.latest == 1 and config.max_length is None

    _write_config(model_dir, {"name": "minilm", "task": "matching", "source": "x", "runtime": "tensorrt"})
    assert load_model_config(model_dir).runtime == "tensorrt"  # a name; the server checks it against RUNTIMES


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("{\"name\": \"minilm\",", r"config\.json: invalid JSON at line 1"),
        ({"name": "minilm", "task": "matching", "source": "x", "colour": "red"},
         r"config\.json: colour: Extra inputs are not permitted"),
        ({"name": "minilm", "task": "matching", "source": "x", "batching": {"max_batch_sise": 8}},
         r"config\.json: batching\.max_batch_sise: Extra inputs are not permitted"),
        ({"name": "minilm", "task": "translation", "source": "x"}, r"config\.json: task: Input should be"),
        ({"name": "minilm", "task": "matching"}, r"config\.json: source: Field required"),
        ({"name": "other", "task": "matching", "source": "x"},
         r"config\.json: name: 'other' does not match folder name 'minilm'"),
        ({"name": "minilm", "task": "matching", "source": "x", "version_policy": {"latest": 1, "all": True}},
         r"config\.json: version_policy: .*exactly one of latest, specific, all"),
    ],
)
def test_load_model_config_errors_name_file_and_field(model_dir: Path, raw: dict | str, expected: str) -> None:
    path = _write_config(model_dir, raw)
    with pytest.raises(ModelConfigError, match=expected) as info:
        load_model_config(model_dir)
    assert str(path) in str(info.value)


def test_load_model_config_missing_file(model_dir: Path) -> None:
    with pytest.raises(ModelConfigError, match=r"config\.json: missing"):
        load_model_config(model_dir)


def test_committed_model_configs_load() -> None:
    for config in sorted((REPO_ROOT / "model_repo").glob(f"*/{MODEL_CONFIG_FILE}")):
        assert load_model_config(config.parent).name == config.parent.name


def test_head_json_round_trips_and_omits_what_is_unset(tmp_path: Path) -> None:
    head = HeadMeta(input_names=["input_ids", "attention_mask"], max_length=128, labels=["a", "b"])
    (tmp_path / HEAD_FILE).write_bytes(head.to_json())
    assert load_head(tmp_path) == head
    assert json.loads(head.to_json()) == {"input_names": ["input_ids", "attention_mask"], "max_length": 128,
                                          "pad_token_id": 0, "labels": ["a", "b"], "normalized": False}
    embedder = HeadMeta(input_names=["input_ids"], max_length=8, normalized=True)
    assert "labels" not in json.loads(embedder.to_json())


def test_head_json_written_before_the_schema_still_loads(tmp_path: Path) -> None:
    """Versions published earlier carried fields nobody read (task, text_pair, source, output_name)."""
    old = {"task": "matching", "labels": None, "max_length": 256, "text_pair": False, "source": "hf",
           "input_names": ["input_ids", "attention_mask", "token_type_ids"], "output_name": "embeddings",
           "normalized": True, "pad_token_id": 0}
    (tmp_path / HEAD_FILE).write_text(json.dumps(old))
    head = load_head(tmp_path)
    assert head.max_length == 256 and head.normalized and head.labels is None
    assert head.input_names == ["input_ids", "attention_mask", "token_type_ids"]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, r"head\.json: missing"),
        ("[1,", r"head\.json: invalid JSON"),
        ({"max_length": 8}, r"head\.json: input_names: Field required"),
        ({"input_names": ["input_ids"], "max_length": 0}, r"head\.json: max_length: Input should be greater"),
        ({"input_names": ["pixels"], "max_length": 8}, r"head\.json: input_names\.0: Input should be"),
        ({"input_names": [], "max_length": 8}, r"head\.json: input_names: List should have at least 1 item"),
        ({"input_names": ["input_ids"], "max_length": 8, "disabled_optimizers": ["ConstantFolding"]},
         r"head\.json: disabled_optimizers\.0: Input should be 'SkipLayerNormFusion'"),
    ],
)
def test_head_json_errors_name_file_and_field(tmp_path: Path, raw: dict | str | None, expected: str) -> None:
    if raw is not None:
        (tmp_path / HEAD_FILE).write_text(raw if isinstance(raw, str) else json.dumps(raw))
    with pytest.raises(HeadError, match=expected):
        load_head(tmp_path)


def test_repository_module_stays_torch_free() -> None:
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import service.repository; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'onnx', 'training', 'quantizer')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code, str(REPO_ROOT)], check=True, timeout=TIMEOUT_S)
