"""The PyTorch runtime: a version's PyTorch plan (torch/) run by the toolkit's own model, on a GPU.

Batches are padded up to (batch, length) buckets: extra rows copy the first row, extra positions are
padding (attention mask 0), so every real row's output is what it would be unpadded. On CUDA one graph is
captured per bucket when the version loads (each after warm-up runs on a side stream, all sharing one
memory pool) and replayed per batch: a small encoder at batch 32 x 128 is bound by kernel launches, which
a replay removes. Everything is captured before the version reports ready. On the CPU (``device: cpu``,
a check of the plan) batches run eagerly at their own shape.

Imported only when a model's config asks for ``runtime: pytorch``: the CPU image never imports torch.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING
import numpy as np
import torch

from service.repository import load_head, load_torch_plan
from service.runtimes import RuntimeInfo, RuntimeSpec
from service.runtimes.torch_plan import DTYPES, build_planned_model

if TYPE_CHECKING:
    from training.model import Model

log = logging.getLogger("sampserve.runtimes")

TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class RuntimeUnavailable(RuntimeError):
    """The runtime cannot run here (no CUDA device, no PyTorch plan in the version)."""


def buckets(asked: list[int], cap: int) -> list[int]:
    """The bucket sizes below ``cap``, then ``cap`` itself (the largest batch or length always fits)."""
    return sorted({b for b in asked if b < cap} | {cap})


def bucket(size: int, sizes: list[int]) -> int:
    """The smallest bucket holding ``size``."""
    for b in sizes:
        if size <= b:
            return b
    raise ValueError(f"{size} exceeds the largest bucket {sizes[-1]}")


def pad_feed(feed: dict[str, np.ndarray], rows: int, length: int | None, pad_id: int) -> dict[str, np.ndarray]:
    """``feed`` grown to ``rows`` rows (copies of row 0) and, for token inputs, ``length`` positions
    (``pad_id`` / mask 0 / type 0)."""
    out = {}
    for name, array in feed.items():
        extra_rows = rows - array.shape[0]
        if extra_rows:
            array = np.concatenate([array, np.repeat(array[:1], extra_rows, axis=0)])
        if length is not None and name in TOKEN_INPUTS and array.shape[1] < length:
            fill = pad_id if name == "input_ids" else 0
            array = np.pad(array, ((0, 0), (0, length - array.shape[1])), constant_values=fill)
        out[name] = np.ascontiguousarray(array)
    return out


class PlannedRunner:
    """A planned model run on its device: eagerly at each batch's own shape, or (CUDA, ``graphs``) by replaying
    the graph captured for the batch's (batch, length) bucket. SAMP times plans through this class too, so
    its figures are what the server runs."""

    def __init__(self, model: Model, input_names: list[str], pad_id: int, dtype: torch.dtype,
                 batch_sizes: list[int], lengths: list[int], graphs: bool) -> None:
        self.model = model
        self.input_names = input_names
        self.pad_id = pad_id
        self.dtype = dtype
        self.device = next(model.buffers(), next(model.parameters())).device
        self.text = all(n in TOKEN_INPUTS for n in input_names)
        self.batch_sizes, self.lengths = batch_sizes, lengths
        self.use_graphs = graphs and self.device.type == "cuda"
        self.graphs: dict[tuple[int, int | None], tuple[dict[str, torch.Tensor], torch.cuda.CUDAGraph,
                                                         torch.Tensor]] = {}
        if self.use_graphs:
            self._capture_all()

    def _tensors(self, feed: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """Token ids as they are; an image's or a sound's float values in the plan's compute dtype."""
        out = {}
        for n in self.input_names:
            tensor = torch.from_numpy(np.ascontiguousarray(feed[n])).to(self.device)
            out[n] = tensor.to(self.dtype) if tensor.is_floating_point() else tensor
        return out

    def run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        rows = feed[self.input_names[0]].shape[0]
        with torch.inference_mode():
            if not self.use_graphs:
                return self.model(**self._tensors(feed)).float().cpu().numpy()
            key = self._key(feed)
            static, graph, output = self.graphs[key]
            padded = pad_feed({n: feed[n] for n in self.input_names}, key[0], key[1], self.pad_id)
            for name, tensor in static.items():
                tensor.copy_(torch.from_numpy(padded[name]))  # copy_ casts a float input to the graph's dtype
            graph.replay()
            return output[:rows].float().cpu().numpy()

    def _key(self, feed: dict[str, np.ndarray]) -> tuple[int, int | None]:
        first = feed[self.input_names[0]]
        length = bucket(first.shape[1], self.lengths) if self.text else None
        return bucket(first.shape[0], self.batch_sizes), length

    def _example(self, rows: int, length: int | None) -> dict[str, np.ndarray]:
        """A feed of the bucket's shape that runs every kernel the real ones do (all positions attended)."""
        if self.text:
            assert length is not None
            ids = np.full((rows, length), self.pad_id, dtype=np.int64)
            ids[:, 0] = 1
            feed = {"input_ids": ids, "attention_mask": np.ones((rows, length), np.int64),
                    "token_type_ids": np.zeros((rows, length), np.int64)}
            return {n: feed[n] for n in self.input_names}
        emb = self.model.config.embedding
        if self.input_names[0] == "pixel_values":
            return {"pixel_values": np.zeros((rows, emb.num_channels, emb.image_size, emb.image_size), np.float32)}
        return {"input_values": np.zeros((rows, emb.max_samples), np.float32)}

    def _capture_all(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        lengths: list[int | None] = list(self.lengths) if self.text else [None]
        with torch.inference_mode():
            for rows in reversed(self.batch_sizes):  # largest first: later graphs reuse its pool memory
                for length in reversed(lengths):
                    static = self._tensors(self._example(rows, length))
                    side = torch.cuda.Stream()
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):
                        for _ in range(2):
                            self.model(**static)
                    torch.cuda.current_stream().wait_stream(side)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool):
                        output = self.model(**static)
                    self.graphs[(rows, length)] = (static, graph, output)
        torch.cuda.synchronize(self.device)
        log.info("captured %d CUDA graphs (batches %s x lengths %s)", len(self.graphs), self.batch_sizes, lengths)


class TorchRuntime:
    """The server's runtime for a version's PyTorch plan (RUNTIMES["pytorch"])."""

    def __init__(self, spec: RuntimeSpec) -> None:
        config = spec.torch
        if config.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeUnavailable(
                "runtime pytorch asks for device cuda, but torch sees no CUDA device (torch "
                f"{torch.__version__}, built for CUDA {torch.version.cuda}); serve the ONNX plan with runtime "
                "onnxruntime, or set pytorch.device to cpu to check the plan on the CPU")
        plan = load_torch_plan(spec.version_dir)
        if plan is None:
            raise RuntimeUnavailable(f"{spec.version_dir}: no torch/plan.json: publish a PyTorch plan with "
                                     "sampserve quantize-gpu, or serve with runtime onnxruntime")
        head = load_head(spec.version_dir)
        device = torch.device("cuda", torch.cuda.current_device()) if config.device == "cuda" else torch.device("cpu")
        self.runner = PlannedRunner(
            build_planned_model(spec.version_dir, plan, device), list(head.input_names), head.pad_token_id,
            DTYPES[plan.compute_dtype], buckets(config.batch_buckets, spec.max_batch_size),
            buckets(config.length_buckets, min(spec.max_length, head.max_length)), config.cuda_graphs)
        self.input_names: list[str] = list(head.input_names)
        self.output_name = "output"
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        detail = {"dtype": plan.compute_dtype, "int8_units": str(len(plan.int8_units)),
                  "cuda_graphs": str(self.runner.use_graphs).lower()}
        self.info = RuntimeInfo("pytorch", f"{device} ({name})" if device.type == "cuda" else "cpu",
                                "pytorch_libtorch", detail)

    def run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        return self.runner.run(feed)

    def healthy(self) -> bool:
        return True
