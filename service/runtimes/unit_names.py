"""Which quantizable unit a weight matrix belongs to, from its module path: one rule for the ONNX
plan (node names the exporter derives from module names, ``/encoder/layers.3/self_attention/query/MatMul``)
and the PyTorch plan (module names, ``encoder.layers.3.self_attention.query``).

Per encoder layer: ``attn_qkv`` (query, key, value projections), ``attn_out``, ``ffn_in`` (and the
gate of a gated FFN), ``ffn_out``; plus ``embeddings`` and ``head`` (the target's weight matrices).
"""

from __future__ import annotations

import re

_LAYER = re.compile(r"/(encoder|decoder)/layers\.(\d+)/")
_KINDS = (
    ("cross_attention", "cross_attn"),
    ("feed_forward/outer", "ffn_out"),
    ("feed_forward/inner", "ffn_in"),
    ("feed_forward/gate", "ffn_in"),
    ("self_attention/output", "attn_out"),
    ("query", "attn_qkv"),
    ("key", "attn_qkv"),
    ("value", "attn_qkv"),
)


def unit_of_node(node_name: str) -> str | None:
    """The unit of an ONNX node (None: not in any unit)."""
    match = _LAYER.search(node_name)
    if match:
        prefix = "" if match.group(1) == "encoder" else "decoder."
        for marker, kind in _KINDS:
            if f"/{marker}/" in node_name:
                return f"{prefix}layer{int(match.group(2))}.{kind}"
        return None
    if node_name.startswith("/embedding/"):
        return "embeddings"
    if node_name.startswith(("/target/", "/lm_head/")):  # lm_head: a decoder export's untied projection
        return "head"
    return None


def unit_of_module(module_name: str) -> str | None:
    """The unit of a torch module path (``encoder.layers.3.feed_forward.inner`` -> ``layer3.ffn_in``):
    the path written as the exporter writes it, dots before a layer index kept."""
    return unit_of_node("/" + re.sub(r"\.(?!\d)", "/", module_name) + "/")
