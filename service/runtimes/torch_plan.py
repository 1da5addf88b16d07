"""A PyTorch plan applied to the toolkit's model: each unit's weight matrices get their form (INT8, FP16,
BF16 or FP32), everything else runs in the plan's compute dtype. One code path for SAMP (which measures
plans with it) and the server's PyTorch runtime (which serves them), so what was measured is what runs.

INT8 is W8A8 with int32 accumulation: weights quantized once per output channel, activations per row
(per token) at run time. A row's integers and scales depend on that row alone and integer sums are exact,
so an INT8 unit's output for one input is bit-identical whatever its batch-mates are; this is what lets a
GPU plan keep the batch invariance the CPU plans are held to. The matrix product is ``torch._int_mm``
(cuBLASLt's int8 GEMM on CUDA, oneDNN's on the CPU).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_model
from torch import nn

from service.repository import TORCH_CONFIG_FILE, TORCH_WEIGHTS_FILE, TorchDtype, TorchForm, TorchPlan
from service.runtimes.unit_names import unit_of_module

if TYPE_CHECKING:
    from training.model import Model

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CUDA_MIN_ROWS = 17
"""cuBLASLt's int8 GEMM behind ``torch._int_mm`` takes more than 16 rows: fewer are padded with zero rows
(which change no other row's result)."""


def int8_capable(linear: nn.Linear) -> bool:
    """Whether a matrix can run as ``torch._int_mm`` on CUDA: both dimensions multiples of 8, above 16."""
    out_features, in_features = linear.weight.shape
    return in_features % 8 == 0 and out_features % 8 == 0 and in_features > 16


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric INT8 per row of a 2-D float tensor: (int8 values, float32 scale per row)."""
    xf = x.float()
    scale = xf.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127.0
    return torch.round(xf / scale).clamp(-127, 127).to(torch.int8), scale


class Int8Linear(nn.Module):
    """W8A8 linear layer: per-output-channel weight scales, per-row activation scales, int32 accumulation;
    the result is returned in the input's dtype."""

    weight: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        if not int8_capable(linear):
            raise ValueError(f"a {tuple(linear.weight.shape)} weight cannot run as an int8 GEMM (dimensions must be "
                             "multiples of 8 and the input above 16)")
        weight, scale = quantize_rows(linear.weight.detach())
        self.register_buffer("weight", weight.contiguous())  # (out, in): passed transposed, column-major
        self.register_buffer("weight_scale", scale.reshape(1, -1))
        bias = linear.bias.detach().float() if linear.bias is not None else None
        self.register_buffer("bias", bias)
        self.out_features = linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1])
        q, scale = quantize_rows(rows)
        count = q.shape[0]
        if q.is_cuda and count < CUDA_MIN_ROWS:
            q = torch.cat([q, q.new_zeros(CUDA_MIN_ROWS - count, q.shape[1])])
        acc = torch._int_mm(q, self.weight.t())[:count]
        y = acc.float() * scale * self.weight_scale
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)


class CastLinear(nn.Module):
    """A linear layer computed in its own dtype inside a body of another (FP32 kept in an FP16 body, say)."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype) -> None:
        super().__init__()
        self.linear = copy.deepcopy(linear).to(dtype)  # the body is cast after: this copy keeps its own
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.to(self.dtype)).to(x.dtype)


def unit_linears(model: nn.Module) -> dict[str, list[str]]:
    """Every unit's ``nn.Linear`` modules by unit name, in model order (the torch units SAMP measures; a
    patch or convolution front end has no Linear and stays in the body's dtype)."""
    units: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            unit = unit_of_module(name)
            if unit is not None:
                units.setdefault(unit, []).append(name)
    return units


def unit_flops(model: nn.Module) -> dict[str, int]:
    """Multiply-adds x 2 per token of each unit's matrices (how a measured saving is shared among units)."""
    modules = dict(model.named_modules())
    return {unit: sum(2 * modules[n].weight.numel() for n in names) for unit, names in unit_linears(model).items()}


def int8_units(model: nn.Module) -> list[str]:
    """Units whose every matrix can run as an int8 GEMM."""
    modules = dict(model.named_modules())
    return [u for u, names in unit_linears(model).items()
            if all(isinstance(m := modules[n], nn.Linear) and int8_capable(m) for n in names)]


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def apply_plan(model: nn.Module, compute_dtype: TorchDtype, forms: dict[str, TorchForm]) -> nn.Module:
    """``model`` (FP32, any device) in the plan's forms, in place, in eval mode: the body cast to
    ``compute_dtype``, each listed unit's matrices replaced by their form. Unknown units are refused."""
    units = unit_linears(model)
    unknown = sorted(set(forms) - set(units))
    if unknown:
        raise ValueError(f"plan names units the model does not have: {', '.join(unknown)} (units: "
                         f"{', '.join(units)})")
    modules = dict(model.named_modules())
    replaced: dict[str, nn.Module] = {}
    for unit, form in forms.items():
        for name in units[unit]:
            linear = modules[name]
            assert isinstance(linear, nn.Linear)
            if form == "int8":
                replaced[name] = Int8Linear(linear)
            elif form != compute_dtype:
                replaced[name] = CastLinear(linear, DTYPES[form])
    model.to(DTYPES[compute_dtype])  # the body; replaced modules are put in after, keeping their own dtypes
    for name, module in replaced.items():
        _replace(model, name, module)
    return model.eval()


def build_planned_model(model_dir: Path, plan: TorchPlan, device: str | torch.device) -> Model:
    """The toolkit model from a version's torch/ folder (config and safetensors weights), on ``device``, in
    ``plan``'s forms."""
    from training.config import ModelConfig
    from training.model import Model

    config = ModelConfig.model_validate(json.loads((Path(model_dir) / TORCH_CONFIG_FILE).read_text()))
    model = Model(config)
    load_model(model, str(Path(model_dir) / TORCH_WEIGHTS_FILE), strict=True)
    apply_plan(model.to(device), plan.compute_dtype, plan.forms)
    return model
