"""The training loop: sharding, accumulation, resume, every task, and the train -> fine-tune ->
evaluate chain through the CLI."""

import json
import random
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from training.checkpoint import load_checkpoint
from training.jobs import TrainJob, run_training
from training.trainer import (Distributed, TrainSettings, global_batches, read_history, resolve_precision,
                              shard)

from .conftest import shrink


def _weights(path):
    return load_file(str(path / "model.safetensors"))


def _settings(**kw):
    base = dict(batch_size=8, max_steps=4, lr=1e-3, max_length=32, progress=False, warmup_ratio=0.0)
    return TrainSettings(**{**base, **kw})


def test_shards_of_all_ranks_make_the_global_batch():
    batch = global_batches(100, 12, seed=3, epoch=1)[2]
    assert len(batch) == 12
    for world in (1, 2, 4):
        for accum in (1, 3):
            shards = [shard(batch, accum, Distributed(rank=r, world_size=world)) for r in range(world)]
            union = sorted(i for rank in shards for micro in rank for i in micro)
            assert union == sorted(batch)
            assert len({len(micro) for rank in shards for micro in rank}) == 1  # equal sizes


def test_epochs_reshuffle_and_are_seeded():
    assert global_batches(50, 10, 0, 0) == global_batches(50, 10, 0, 0)
    assert global_batches(50, 10, 0, 0) != global_batches(50, 10, 0, 1)


def test_settings_are_validated():
    with pytest.raises(ValueError, match="multiple of grad_accum"):
        TrainSettings(batch_size=10, grad_accum=3)
    with pytest.raises(ValueError, match="fp16 needs a CUDA"):
        resolve_precision("fp16", torch.device("cpu"))


def test_grad_accumulation_matches_one_big_batch(tmp_path, topics_data):
    job = dict(data=topics_data / "train.jsonl", config="tiny-bert")
    run_training(TrainJob(out_dir=tmp_path / "a", **job), _settings(grad_accum=1))
    run_training(TrainJob(out_dir=tmp_path / "b", **job), _settings(grad_accum=4))
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=2e-5, rtol=0, msg=key)


def test_resume_continues_exactly(tmp_path, topics_data):
    job = dict(data=topics_data / "train.jsonl", config="tiny-bert")
    run_training(TrainJob(out_dir=tmp_path / "straight", **job), _settings(max_steps=6))
    # A run that stops after step 3 (a time limit), then resumes to the end.
    run_training(TrainJob(out_dir=tmp_path / "resumed", **job), _settings(max_steps=6, stop_at_step=3))
    state = json.loads((tmp_path / "resumed/trainer_state/state.json").read_text())
    assert state["step"] == 3
    run_training(TrainJob(out_dir=tmp_path / "resumed", resume=True, **job), _settings(max_steps=6))
    straight, resumed = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    # The per-step history survives the stop: one row per step, the same losses as the straight run.
    rows, resumed_rows = read_history(tmp_path / "straight"), read_history(tmp_path / "resumed")
    assert [r["step"] for r in resumed_rows] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in resumed_rows] == pytest.approx([r["loss"] for r in rows], abs=1e-6)
    assert all(r["lr"] > 0 and "accuracy" in r for r in rows)  # the schedule's lr and the target's metrics


def test_classification_checkpoint_has_labels_and_tokenizer(tmp_path, topics_data):
    run_training(TrainJob(data=topics_data / "train.jsonl", out_dir=tmp_path / "c", config="tiny-bert"),
                 _settings(max_steps=2))
    checkpoint = load_checkpoint(tmp_path / "c")
    labels = {json.loads(line)["label"] for line in (topics_data / "train.jsonl").open()}
    assert checkpoint.head.labels == sorted(labels)
    assert checkpoint.config.target.num_labels == len(labels)
    assert checkpoint.tokenizer.encode("hello").ids


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _texts(topics_data, n=64):
    return [json.loads(line)["text"] for line in (topics_data / "train.jsonl").open()][:n]


def test_mlm_pretraining_lowers_the_loss(tmp_path, topics_data):
    data = _write(tmp_path / "mlm.jsonl", [{"text": t} for t in _texts(topics_data)])
    job = TrainJob(data=data, dev=data, out_dir=tmp_path / "mlm", config="tiny-bert", target="mlm")
    before = run_training(job, _settings(max_steps=1, lr=1e-9)).dev_metrics["loss"]
    after = run_training(TrainJob(data=data, dev=data, out_dir=tmp_path / "mlm2", config="tiny-bert",
                                  target="mlm"), _settings(max_steps=30, lr=2e-3)).dev_metrics["loss"]
    assert after < before - 1.0


def test_causal_lm_and_generation_finetuning(tmp_path, topics_data, minilm_dir):
    config = shrink("gpt2", vocab_size=30522, eos_token_id=102, pad_token_id=0)
    config_file = tmp_path / "gpt.json"
    config_file.write_text(config.to_json())
    texts = _texts(topics_data, 32)
    data = _write(tmp_path / "lm.jsonl", [{"text": t} for t in texts])
    job = dict(data=data, dev=data, config=str(config_file))
    before = run_training(TrainJob(out_dir=tmp_path / "lm0", **job), _settings(max_steps=1, lr=1e-9))
    after = run_training(TrainJob(out_dir=tmp_path / "lm", **job), _settings(max_steps=30, lr=3e-3))
    assert after.dev_metrics["loss"] < before.dev_metrics["loss"] - 1.0
    # generation fine-tuning: only the completion is scored
    pairs = _write(tmp_path / "gen.jsonl", [{"prompt": t[:10], "completion": t[10:]} for t in texts])
    tuned = run_training(TrainJob(data=pairs, out_dir=tmp_path / "gen", init_from=tmp_path / "lm"),
                         _settings(max_steps=2))
    assert tuned.steps == 2 and load_checkpoint(tmp_path / "gen").head.task == "lm"


def test_seq2seq_training_runs(tmp_path, topics_data):
    config = shrink("t5-small", vocab_size=30522, eos_token_id=102, pad_token_id=0)
    config_file = tmp_path / "t5.json"
    config_file.write_text(config.to_json())
    data = _write(tmp_path / "s2s.jsonl", [{"source": t, "target": t.upper()[:20]} for t in _texts(topics_data)])
    first = run_training(TrainJob(data=data, dev=data, out_dir=tmp_path / "a", config=str(config_file)),
                         _settings(max_steps=1, lr=1e-9)).dev_metrics["loss"]
    later = run_training(TrainJob(data=data, dev=data, out_dir=tmp_path / "b", config=str(config_file)),
                         _settings(max_steps=20, lr=3e-3)).dev_metrics["loss"]
    assert later < first


def test_matching_training_from_minilm(tmp_path, topics_data, minilm_checkpoint):
    texts = _texts(topics_data, 32)
    data = _write(tmp_path / "pairs.jsonl", [{"text_a": t, "text_b": t.lower()} for t in texts])
    result = run_training(TrainJob(data=data, dev=data, out_dir=tmp_path / "m", init_from=minilm_checkpoint),
                          _settings(max_steps=2, lr=1e-5))
    assert result.dev_metrics["accuracy"] > 0.9  # a text and its lower-cased copy: MiniLM finds the pair


def test_bf16_autocast_trains_on_cpu(tmp_path, topics_data):
    result = run_training(TrainJob(data=topics_data / "train.jsonl", out_dir=tmp_path / "bf",
                                   config="tiny-bert"), _settings(max_steps=2, precision="bf16"))
    assert result.train_loss == result.train_loss  # not NaN


def test_bad_records_name_the_missing_field(tmp_path):
    data = _write(tmp_path / "bad.jsonl", [{"txt": "x", "label": "a"}])
    with pytest.raises(ValueError, match=r"record 1 lacks \['text'\]"):
        run_training(TrainJob(data=data, out_dir=tmp_path / "o", config="tiny-bert"), _settings())


def test_tsv_records_are_read(tmp_path, topics_data):
    rows = [json.loads(line) for line in (topics_data / "train.jsonl").open()][:40]
    tsv = tmp_path / "train.tsv"
    tsv.write_text("text\tlabel\n" + "".join(f"{r['text'].replace(chr(9), ' ')}\t{r['label']}\n" for r in rows))
    assert run_training(TrainJob(data=tsv, out_dir=tmp_path / "t", config="tiny-bert"),
                        _settings(max_steps=1)).steps == 1


def test_pretrain_finetune_evaluate_chain_through_the_cli(tmp_path, topics_data):
    """train (MLM from scratch) -> fine-tune (classification) -> evaluate, as a user runs them."""
    texts = _write(tmp_path / "text.jsonl", [{"text": t} for t in _texts(topics_data, 64)])
    cli = [sys.executable, "-m", "sampserve.cli"]
    common = ["--batch-size", "8", "--max-length", "32", "--lr", "1e-3"]
    steps = [
        [*cli, "train", "--config", "tiny-bert", "--target", "mlm", "--data", str(texts),
         "--out", str(tmp_path / "pre"), "--max-steps", "4", *common],
        [*cli, "train", "--init-from", str(tmp_path / "pre"), "--target", "cls", "--data",
         str(topics_data / "train.jsonl"), "--dev", str(topics_data / "dev.jsonl"),
         "--out", str(tmp_path / "cls"), "--max-steps", "4", *common],
    ]
    for command in steps:
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    assert "dev {" in done.stdout
    evaluated = subprocess.run([*cli, "evaluate", "--checkpoint", str(tmp_path / "cls"), "--data",
                                str(topics_data / "test.jsonl")], capture_output=True, text=True, timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    metrics = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["loss"] > 0


def test_length_grouped_batches_cover_the_same_records_with_less_padding() -> None:



    lengths = [random.Random(i).randint(3, 64) for i in range(2000)]
    plain = global_batches(2000, 16, seed=0, epoch=0)
    grouped = global_batches(2000, 16, seed=0, epoch=0, lengths=lengths)
    assert sorted(i for b in grouped for i in b) == sorted(i for b in plain for i in b)  # a permutation's batches
    assert global_batches(2000, 16, seed=0, epoch=0, lengths=lengths) == grouped  # seeded
    assert global_batches(2000, 16, seed=0, epoch=1, lengths=lengths) != grouped

    def padding(batches: list[list[int]]) -> int:
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    assert padding(grouped) < padding(plain) / 5
    order = [min(lengths[i] for i in b) for b in grouped]
    assert order != sorted(order)  # the batches themselves are shuffled, not served short to long
