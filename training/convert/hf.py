"""Import Hugging Face checkpoints into our format, and export ours back.

Only safetensors weights are read (``pytorch_model.bin`` is a pickle and is refused). A
sentence-transformers folder (``modules.json``, ``1_Pooling/config.json``) keeps its pooling,
normalization and max sequence length, so the imported model embeds exactly as it did.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer

from training.checkpoint import PREPROCESSOR_FILE, Checkpoint, HeadInfo
from training.components import TARGETS
from training.convert.families import FAMILIES, family_of, vit_saved_names, wav2vec2_saved_names
from training.convert.rules import export_state, import_state
from training.config import ModelConfig
from training.model import Model


def read_safetensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) safetensors checkpoint."""
    index = hf_dir / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (hf_dir / "model.safetensors").exists():
        files = ["model.safetensors"]
    elif (hf_dir / "pytorch_model.bin").exists():
        raise ValueError(f"{hf_dir} holds only pytorch_model.bin (a pickle); convert it to safetensors first")
    else:
        raise FileNotFoundError(f"no model.safetensors in {hf_dir}")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        with safe_open(str(hf_dir / name), framework="pt") as f:
            for key in f.keys():
                state[key] = f.get_tensor(key)
    return state


def _sentence_transformers_extras(hf_dir: Path) -> dict[str, Any]:
    """Pooling, normalization and max length from a sentence-transformers folder, if it is one."""
    extras: dict[str, Any] = {}
    modules_file = hf_dir / "modules.json"
    if not modules_file.exists():
        return extras
    modules = json.loads(modules_file.read_text())
    extras["normalize"] = False
    for module in modules:
        kind = module.get("type", "")
        if kind.endswith("Pooling"):
            pooling = json.loads((hf_dir / module["path"] / "config.json").read_text())
            modes = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean",
                     "pooling_mode_max_tokens": "max"}
            chosen = [ours for key, ours in modes.items() if pooling.get(key)]
            if len(chosen) != 1:
                raise ValueError(f"unsupported sentence-transformers pooling {pooling}")
            extras["pooling"] = chosen[0]
        if kind.endswith("Normalize"):
            extras["normalize"] = True
    st_config = hf_dir / "sentence_bert_config.json"
    if st_config.exists():
        extras["max_length"] = json.loads(st_config.read_text()).get("max_seq_length")
    return extras


def input_length(config: ModelConfig) -> int:
    """Positions the encoder sees for one input of a tensor model: patches + the class token, or the
    frames of the clip length the model takes (HeadInfo.max_length)."""
    if config.modality == "image":
        return config.embedding.num_patches + 1
    return config.embedding.frames(config.embedding.max_samples)


def unique_parameter_names(model: Model) -> set[str]:
    """Parameter names with each tied tensor counted once (under its first name)."""
    return {name for name, _ in model.named_parameters()}


def import_hf(hf_dir: Path, architecture: str | None = None) -> tuple[Checkpoint, list[str]]:
    """HF folder -> our model, head and tokenizer. Returns the checkpoint and HF tensors left unused."""
    hf_dir = Path(hf_dir)
    hf_config = json.loads((hf_dir / "config.json").read_text())
    model_type = hf_config.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {sorted(FAMILIES)}")
    family = FAMILIES[model_type]
    arch = architecture or (hf_config.get("architectures") or [None])[0]
    if arch not in family.architectures:
        raise ValueError(f"unsupported architecture {arch!r}; supported: {sorted(family.architectures)}")
    extras = _sentence_transformers_extras(hf_dir)
    config = family.to_ours(hf_config, arch, extras)
    model = Model(config)
    hf_state = read_safetensors(hf_dir)
    if model_type == "vit":
        hf_state = vit_saved_names(hf_state)
    if model_type == "wav2vec2":
        hf_state = wav2vec2_saved_names(hf_state, config)
    rules = family.rules(config)
    shapes = {name: p.shape for name, p in model.named_parameters()}
    state = import_state(rules, hf_state, shapes)
    uncovered = unique_parameter_names(model) - set(state)
    if uncovered:
        raise ValueError(f"conversion rules leave parameters unset: {sorted(uncovered)}")
    model.load_state_dict(state, strict=False)
    model.eval()
    used = {r.hf for r in rules}
    unused = sorted(k for k in hf_state if k not in used and not k.endswith("position_ids"))

    id2label = hf_config.get("id2label") or {}
    labels = [id2label[k] for k in sorted(id2label, key=int)] if config.target.name == "cls" else None
    max_length = extras.get("max_length") or config.embedding.max_position - (
        (config.embedding.position_padding_idx or -1) + 1
    )
    head = HeadInfo(
        task=TARGETS[config.target.name].task,
        labels=labels,
        max_length=max_length,
        source=f"{hf_config.get('_name_or_path') or hf_dir.name} ({arch})",
    )
    if config.modality != "text":
        preprocessor_file = hf_dir / PREPROCESSOR_FILE
        if not preprocessor_file.exists():
            raise FileNotFoundError(f"{hf_dir} has no {PREPROCESSOR_FILE} (how {config.modality} becomes tensors)")
        head.max_length = input_length(config)
        return Checkpoint(model=model, head=head, tokenizer=None, path=hf_dir,
                          preprocessor=json.loads(preprocessor_file.read_text())), unused
    tokenizer_file = hf_dir / "tokenizer.json"
    if not tokenizer_file.exists():
        raise FileNotFoundError(f"{hf_dir} has no tokenizer.json (the fast tokenizer format)")
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    return Checkpoint(model=model, head=head, tokenizer=tokenizer, path=hf_dir), unused


def export_hf(checkpoint: Checkpoint, out_dir: Path) -> Path:
    """Our checkpoint -> a folder that transformers' ``from_pretrained`` loads."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = checkpoint.config
    family = family_of(config)
    arch = family.architecture_for(config.target.name)
    hf_config = {**family.to_hf(config), "architectures": [arch]}
    if checkpoint.head.labels:
        hf_config["id2label"] = {str(i): label for i, label in enumerate(checkpoint.head.labels)}
        hf_config["label2id"] = {label: i for i, label in enumerate(checkpoint.head.labels)}
    state = {name: p.detach() for name, p in checkpoint.model.named_parameters()}
    tensors = export_state(family.rules(config), state)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2))
    if checkpoint.preprocessor is not None:
        (out_dir / PREPROCESSOR_FILE).write_text(json.dumps(checkpoint.preprocessor, indent=2))
    if checkpoint.tokenizer is not None:
        checkpoint.tokenizer.save(str(out_dir / "tokenizer.json"))
    if config.target.name == "contrastive" and config.modality == "text":
        _write_sentence_transformers_files(checkpoint, out_dir)
    source_dir = checkpoint.path
    for extra in ("tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if source_dir and (source_dir / extra).exists():
            shutil.copy(source_dir / extra, out_dir / extra)
    return out_dir


def _write_sentence_transformers_files(checkpoint: Checkpoint, out_dir: Path) -> None:
    """Make an exported embedding model loadable by sentence-transformers with the same pooling."""
    target = checkpoint.config.target
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if target.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (out_dir / "2_Normalize").mkdir(exist_ok=True)
    (out_dir / "modules.json").write_text(json.dumps(modules, indent=2))
    (out_dir / "1_Pooling").mkdir(exist_ok=True)
    pooling = {
        "word_embedding_dimension": checkpoint.config.hidden_size,
        "pooling_mode_cls_token": target.pooling == "cls",
        "pooling_mode_mean_tokens": target.pooling == "mean",
        "pooling_mode_max_tokens": target.pooling == "max",
        "pooling_mode_mean_sqrt_len_tokens": False,
    }
    (out_dir / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2))
    st_config = {"max_seq_length": checkpoint.head.max_length, "do_lower_case": False}
    (out_dir / "sentence_bert_config.json").write_text(json.dumps(st_config, indent=2))
