"""A published plan as a drop-in ``torch.nn.Module``: same inputs as the FP32 model (token ids, or
raw texts), torch tensors out, the chosen mixed-precision graph running underneath."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from quantizer.engines import ort_session
from service.repository import ONNX_FILE, TOKENIZER_FILE, load_head, verify
from training.tokenization import configured


class SampModule(torch.nn.Module):
    def __init__(self, version_dir: Path, threads: int | None = None) -> None:
        super().__init__()
        self.version_dir = Path(version_dir)
        self.head = load_head(self.version_dir)
        self.session = ort_session(self.version_dir / ONNX_FILE, threads)
        self.input_names: list[str] = list(self.head.input_names)
        self.tokenizer = configured(Tokenizer.from_file(str(self.version_dir / TOKENIZER_FILE)),
                                    self.head.max_length, self.head.pad_token_id)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        texts: list[str] | None = None,
    ) -> torch.Tensor:
        if texts is not None:
            enc = self.tokenizer.encode_batch(texts)
            input_ids = torch.tensor([e.ids for e in enc])
            attention_mask = torch.tensor([e.attention_mask for e in enc])
            token_type_ids = torch.tensor([e.type_ids for e in enc])
        if input_ids is None:
            raise ValueError("pass input_ids (and attention_mask) or texts")
        given: dict[str, torch.Tensor] = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids) if attention_mask is None else attention_mask,
            "token_type_ids": torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids,
        }
        feed = {name: np.ascontiguousarray(given[name].detach().cpu().numpy().astype(np.int64))
                for name in self.input_names}
        (out,) = self.session.run(None, feed)
        return torch.from_numpy(out).to(input_ids.device)


def load(version_dir: Path, threads: int | None = None) -> SampModule:
    """Verify the version's manifest, then load its plan as a torch module."""
    verify(Path(version_dir))
    return SampModule(version_dir, threads)
