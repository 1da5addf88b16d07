"""Fold a static QDQ graph into integer MatMuls with fixed activation scales (the CPU form).

onnxruntime's ``quantize_static`` writes QuantizeLinear -> DequantizeLinear on each quantized
activation and DequantizeLinear on each INT8 weight; at load time onnxruntime fuses every
DQ -> MatMul into ``MatMulIntegerToFloat`` but leaves three costs behind (profiled on all-MiniLM-L6-v2,
batch 32 x 128, docs/design.md "Folding the static graph"):

- the bias ``Add`` after each MatMul stays a separate pass over the output (and the FFN's becomes a
  ``BiasGelu``, slower than ``Gelu`` here);
- every other consumer of the quantized activation reads the dequantized copy: the residual
  connections carry INT8-rounded values, which costs accuracy as well as a ``DequantizeLinear``;
- a DequantizeLinear per consumer.

``fold_static`` rewrites each ``Q -> DQ -> MatMul(., DQ(W)) [-> Add(bias)]`` as ``Q ->
MatMulIntegerToFloat(q, W, scale, w_scale, zero, w_zero, bias)`` (a com.microsoft op that takes the
bias) and points the other consumers back at the FP32 tensor. Activation scales stay the calibrated
constants, so a row's output still does not depend on its batch-mates. The result runs on
onnxruntime's CPU provider only; TensorRT's explicit quantization reads the unfolded QDQ graph.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import onnx
from onnx import helper

MS_DOMAIN = "com.microsoft"


def fold_static(qdq_path: Path, out_path: Path) -> int:
    """Write ``out_path``, the folded form of the QDQ graph at ``qdq_path``; return how many MatMuls were folded."""
    model = onnx.load(str(qdq_path))
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)

    removed: set[int] = set()  # id() of nodes dropped from the graph
    replacement: dict[int, onnx.NodeProto] = {}  # id() of a MatMul -> its MatMulIntegerToFloat
    folded = 0
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        act_dq, weight_dq = producer.get(node.input[0]), producer.get(node.input[1])
        if not (_is_activation_dq(act_dq, producer) and _is_weight_dq(weight_dq, initializers)):
            continue
        assert act_dq is not None and weight_dq is not None
        output = node.output[0]
        bias = _bias_add(output, consumers[output], initializers)
        inputs = [act_dq.input[0], weight_dq.input[0], act_dq.input[1], weight_dq.input[1],
                  act_dq.input[2], weight_dq.input[2]]
        if bias is not None:
            bias_add, bias_name = bias
            inputs.append(bias_name)
            output = bias_add.output[0]
            removed.add(id(bias_add))
        replacement[id(node)] = helper.make_node("MatMulIntegerToFloat", inputs, [output], name=node.name,
                                                 domain=MS_DOMAIN)
        if len(consumers[weight_dq.output[0]]) == 1:
            removed.add(id(weight_dq))
        folded += 1

    # Activation DQs: their MatMul consumers are folded; anything else (a residual Add) reads the FP32 tensor.
    rewired: dict[str, str] = {}
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and _is_activation_dq(node, producer):
            users = consumers[node.output[0]]
            if any(id(u) in replacement for u in users):
                rewired[node.output[0]] = producer[node.input[0]].input[0]
                removed.add(id(node))

    nodes = []
    for node in graph.node:
        if id(node) in removed:
            continue
        node = replacement.get(id(node), node)
        for i, name in enumerate(node.input):
            if name in rewired:
                node.input[i] = rewired[name]
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    if not any(op.domain == MS_DOMAIN for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    _drop_unused_initializers(graph)
    onnx.save(model, str(out_path))
    return folded


def _is_activation_dq(node: onnx.NodeProto | None, producer: dict[str, onnx.NodeProto]) -> bool:
    """A per-tensor DequantizeLinear fed by a QuantizeLinear (a calibrated activation)."""
    if node is None or node.op_type != "DequantizeLinear" or len(node.input) < 3:
        return False
    source = producer.get(node.input[0])
    return source is not None and source.op_type == "QuantizeLinear"


def _is_weight_dq(node: onnx.NodeProto | None, initializers: dict[str, onnx.TensorProto]) -> bool:
    """A DequantizeLinear of a constant 2-D INT8 weight, per tensor or per output channel (axis 1)."""
    if node is None or node.op_type != "DequantizeLinear" or len(node.input) < 3:
        return False
    if not all(name in initializers for name in node.input[:3]):
        return False
    weight = initializers[node.input[0]]
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
    return len(weight.dims) == 2 and weight.data_type == onnx.TensorProto.INT8 and axis in (1, -1)


def _bias_add(output: str, users: list[onnx.NodeProto],
              initializers: dict[str, onnx.TensorProto]) -> tuple[onnx.NodeProto, str] | None:
    """The MatMul's only consumer when it adds a constant 1-D FP32 bias."""
    if len(users) != 1 or users[0].op_type != "Add":
        return None
    add = users[0]
    other = add.input[1] if add.input[0] == output else add.input[0]
    tensor = initializers.get(other)
    if tensor is None or len(tensor.dims) != 1 or tensor.data_type != onnx.TensorProto.FLOAT:
        return None
    return add, other


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    keep = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)

