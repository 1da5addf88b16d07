"""Text generation: continuous batching over a decoder graph with a key/value cache, no torch.

The contract with the exporter (``quantizer.export.export_decoder``) is the graph's signature:

- inputs ``input_ids`` (B, T), ``attention_mask`` (B, P+T) and ``position_ids`` (B, T), all int64,
  and ``past_key_values.{i}.key`` / ``.value`` (B, kv_heads, P, head_dim) float32 for each layer i;
  P = 0 at prefill (empty past tensors);
- outputs ``logits`` (B, vocab) float32 for the **last** position of each row only, and
  ``present.{i}.key`` / ``.value`` (B, kv_heads, P+T, head_dim).

Rows are left-padded, so every row's last position is a real token; position ids count each row's
attended tokens (a padded row computes what it would alone). ``head.json`` carries the layer and
head counts, the stop token ids and the chat template (``service.repository.GenerationMeta``).
"""

from service.generation.params import Delta, FinishReason, SamplingParams

__all__ = ["Delta", "FinishReason", "SamplingParams"]
