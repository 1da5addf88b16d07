"""Quantizable units of an exported graph: the groups of weight MatMuls a plan switches together.

Per encoder layer: ``attn_qkv`` (query, key, value projections), ``attn_out``, ``ffn_in`` (and the
gate of a gated FFN), ``ffn_out``; plus ``embeddings`` (the word-table Gather, and the projection
of a factorized embedding) and ``head`` (weight MatMuls of the target). Units are found from the
ONNX node names, which the exporter derives from our module names (``/encoder/layers.3/...``), by the
rule the PyTorch plan shares (service.runtimes.unit_names).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import numpy_helper

from service.runtimes.unit_names import unit_of_node


@dataclass(frozen=True)
class Unit:
    name: str  # e.g. "layer3.ffn_out"
    nodes: tuple[str, ...]  # ONNX node names
    flops_per_token: int  # multiply-adds x2 of the weight matrices, for the quantization rate


def find_units(model_path: Path) -> list[Unit]:
    """Every unit with at least one weight MatMul (or the word-table Gather), in graph order."""
    graph = onnx.load(str(model_path), load_external_data=False).graph
    weights = {init.name: init for init in graph.initializer}
    grouped: dict[str, list[str]] = {}
    flops: dict[str, int] = {}
    for node in graph.node:
        if node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in weights:
            k, n = numpy_helper.to_array(weights[node.input[1]]).shape[-2:]
            cost = 2 * int(k) * int(n)
        elif node.op_type == "Gather" and node.input[0] in weights and weights[node.input[0]].dims[0] > 1000:
            cost = 0  # a table lookup: smaller, not faster
        else:
            continue
        name = unit_of_node(node.name)
        if name is None:
            continue
        grouped.setdefault(name, []).append(node.name)
        flops[name] = flops.get(name, 0) + cost
    return [Unit(name=n, nodes=tuple(nodes), flops_per_token=flops[n]) for n, nodes in grouped.items()]


def quantization_rate(units: list[Unit], int8: set[str]) -> float:
    """Share of weight-matrix FLOPs that run in INT8 under a plan."""
    total = sum(u.flops_per_token for u in units)
    return sum(u.flops_per_token for u in units if u.name in int8) / total if total else 0.0
