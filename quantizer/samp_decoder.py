"""SAMP for causal LMs: the same steps as for encoders (sensitivity, search, verification, report),
judged by next-token agreement with FP32 instead of a task metric.

- **Metric.** Teacher-forced top-1 next-token agreement with the FP32 graph on held-out text, and
  the change in perplexity on that text. Both are measured through the served graph's own decode
  path: a short prefill, then one token per step with the KV cache.
- **Forms.** ``blockwise``: onnxruntime's MatMulNBits with 8-bit weights (blocks of 32, symmetric)
  and accuracy level 4, which quantizes activations per row in blocks, so a sequence's logits do
  not depend on its batch-mates. ``dynamic``: per-channel INT8 weights with one activation scale
  for the whole batch (quantize_dynamic): usually faster, but a batch-mate with a large activation
  changes every other row's rounding. ``batch_invariant`` (default) admits only the first; the plan
  is verified batch-invariant either way (greedy tokens alone vs inside a mixed batch) and the
  report says so.
- **Sensitivity.** Each unit is simulated in INT8 in PyTorch (the form's rounding applied to that
  unit's weights and inputs) over the dev sequences in one forward pass: 121 units of SmolLM2 take
  minutes instead of the hour that building and loading 121 graphs would. Units whose inputs carry
  massive activations (SmolLM2's FFN down-projections of a few layers) show up here. The chosen
  plan is then built and verified on the real graph, and backed off until it meets the budget.
"""

from __future__ import annotations

import functools
import random
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from rich.progress import Progress

from quantizer.decoder_export import OrtDecoder
from quantizer.engines import ort_session
from quantizer.export import ExportInfo, export_decoder
from quantizer.quantize import BLOCK, apply_plan
from quantizer.schemas import Candidate, SampReport, SampResult
from quantizer.search import UnitMeasurement, greedy_order, largest_fitting_prefix, plan_from
from quantizer.timing import TORCH, Quietness, Timing, TimingPolicy, combine, measure, paired_ratio
from quantizer.units import Unit, find_units, quantization_rate
from service.provenance import host_info
from training.checkpoint import Checkpoint

Form = Literal["blockwise", "dynamic"]


class DecoderSampSettings(BaseModel):
    """What the user asks of SAMP for a generator; validated before any work starts."""

    model_config = ConfigDict(extra="forbid")

    min_agreement: float = Field(0.98, gt=0, le=1, description="Lowest teacher-forced top-1 agreement with FP32.")
    max_perplexity_increase: float = Field(0.02, ge=0, description="Largest relative perplexity increase (0.02 = 2%).")
    form: Literal["auto", "blockwise", "dynamic"] = "auto"
    batch_invariant: bool = Field(True, description="Admit only INT8 forms whose rows do not depend on batch-mates.")
    sequences: int = Field(48, ge=2, description="Held-out sequences in each of dev and test.")
    confidence_z: float = Field(
        1.645, ge=0, description="A plan passes when agreement - z * its standard error meets min_agreement (95%).")
    length: int = Field(64, ge=16, description="Tokens per held-out sequence.")
    context: int = Field(8, ge=1, description="Tokens prefilled before the scored decode steps.")
    sensitivity_sequences: int = Field(
        8, ge=1, description="Dev sequences of the per-unit pass (each unit costs a forward over them).")
    threads: int | None = Field(None, ge=1)
    timing: TimingPolicy = Field(default_factory=lambda: TimingPolicy(rounds=3, per_round=2),
                                 description="Decode steps timed interleaved, with the quietness check.")
    latency_batches: tuple[int, ...] = (1, 8)


@dataclass
class LmEval:
    """Token sequences (N, L): the first ``context`` are prefilled, each later one is scored."""

    ids: np.ndarray
    context: int


def lm_sequences(checkpoint: Checkpoint, texts: list[str], settings: DecoderSampSettings,
                 seed: int = 0) -> tuple[LmEval, LmEval]:
    """Disjoint dev and test sets: texts shuffled, split in halves, each joined into fixed-length runs."""
    rows = list(texts)
    random.Random(seed).shuffle(rows)
    half = len(rows) // 2

    def pack(part: list[str]) -> LmEval:
        ids: list[int] = []
        for text in part:
            ids += checkpoint.text_tokenizer.encode(text + "\n", add_special_tokens=False).ids
            if len(ids) >= settings.sequences * settings.length:
                break
        need = settings.sequences * settings.length
        if len(ids) < need:
            raise ValueError(f"SAMP needs {need} tokens of held-out text per split, got {len(ids)}")
        return LmEval(np.array(ids[:need], dtype=np.int64).reshape(settings.sequences, settings.length),
                      settings.context)

    return pack(rows[:half]), pack(rows[half:])


@dataclass
class Predictions:
    """What a graph predicts at every scored position: its top-1 token and the log-probability it
    gives the true next token (kept instead of the logits: 48 x 56 x 49,152 floats are 0.5 GB)."""

    top1: np.ndarray  # (N, S) int
    target_logp: np.ndarray  # (N, S) float64

    @property
    def nll(self) -> float:
        return float(-self.target_logp.mean())

    def agreement(self, reference: Predictions) -> float:
        return float((self.top1 == reference.top1).mean())


def teacher_forced(decoder: OrtDecoder, data: LmEval) -> Predictions:
    """Predictions at every scored position, through prefill + one-token decode steps with the cache."""
    ids = data.ids
    top1, logp = [], []

    def score(logits: np.ndarray, position: int) -> None:
        shifted = logits.astype(np.float64) - logits.max(-1, keepdims=True)
        log_z = np.log(np.exp(shifted).sum(-1))
        top1.append(logits.argmax(-1))
        logp.append(shifted[np.arange(len(ids)), ids[:, position]] - log_z)

    logits, past = decoder.run(ids[:, :data.context], np.ones((ids.shape[0], data.context), np.int64), None)
    score(logits, data.context)
    for t in range(data.context, ids.shape[1] - 1):
        logits, past = decoder.run(ids[:, t:t + 1], np.ones((ids.shape[0], t + 1), np.int64), past)
        score(logits, t + 1)
    return Predictions(np.stack(top1, axis=1), np.stack(logp, axis=1))


def lower_bound(agreement: float, positions: int, z: float) -> float:
    """One-sided normal lower confidence bound of an agreement rate measured on ``positions`` tokens."""
    return agreement - z * float(np.sqrt(max(agreement * (1 - agreement), 1e-12) / positions))


# ---------------------------------------------------------------------------------- simulation


def _quantize_rows_blockwise(x: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 rounding per row in blocks of 32 along the last axis (MatMulNBits acc4)."""
    k = x.shape[-1]
    pad = (-k) % BLOCK
    blocks = torch.nn.functional.pad(x, (0, pad)).reshape(*x.shape[:-1], -1, BLOCK)
    scale = blocks.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 127
    return ((blocks / scale).round().clamp(-127, 127) * scale).reshape(*x.shape[:-1], -1)[..., :k]


def _quantize_tensor_dynamic(x: torch.Tensor) -> torch.Tensor:
    """Asymmetric uint8 rounding with one scale for the whole tensor (DynamicQuantizeLinear)."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (hi - lo) / 255 or 1e-12
    zero = round(-lo / scale)
    return ((x / scale).round() + zero).clamp(0, 255).sub(zero) * scale


def _quantize_weight(weight: torch.Tensor, form: Form) -> torch.Tensor:
    """(out, in) weights: blocks of 32 along ``in`` (blockwise) or one scale per output channel."""
    if form == "blockwise":
        return _quantize_rows_blockwise(weight)
    scale = weight.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 127
    return (weight / scale).round().clamp(-127, 127) * scale


def unit_modules(model: torch.nn.Module, unit: str, head: torch.nn.Linear) -> list[torch.nn.Linear]:
    """The Linear layers of a unit, by the names units.py gives them."""
    if unit == "head":
        return [head]
    layer, kind = unit.split(".")
    block = model.get_submodule(f"encoder.layers.{int(layer.removeprefix('layer'))}")
    names = {"attn_qkv": ("self_attention.query", "self_attention.key", "self_attention.value"),
             "attn_out": ("self_attention.output",), "ffn_in": ("feed_forward.inner", "feed_forward.gate"),
             "ffn_out": ("feed_forward.outer",)}[kind]
    modules = [block.get_submodule(n) for n in names]
    return [m for m in modules if isinstance(m, torch.nn.Linear)]


@contextmanager
def simulated_int8(modules: list[torch.nn.Linear], form: Form):
    """Run these Linear layers with the form's INT8 rounding of weights and inputs."""
    saved = [(m, m.forward) for m in modules]
    act = _quantize_rows_blockwise if form == "blockwise" else _quantize_tensor_dynamic
    for module in modules:
        weight = _quantize_weight(module.weight.detach(), form)

        def forward(x: torch.Tensor, _m: torch.nn.Linear = module, _w: torch.Tensor = weight) -> torch.Tensor:
            return torch.nn.functional.linear(act(x), _w, _m.bias)

        module.forward = forward  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        for module, original in saved:
            module.forward = original  # type: ignore[method-assign]


# ---------------------------------------------------------------------------------- the run


class DecoderSamp:
    """One SAMP run over a causal LM checkpoint."""

    def __init__(self, checkpoint: Checkpoint, texts: list[str], settings: DecoderSampSettings,
                 workdir: Path | None = None, progress: Progress | None = None) -> None:
        self.checkpoint = checkpoint
        self.settings = settings
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="samp-lm-"))
        self.progress = progress
        self._step("exporting the prefill/decode graph")
        self.info: ExportInfo = export_decoder(checkpoint, self.workdir / "fp32.onnx")
        # The embedding lookup is a Gather: INT8 would shrink it, not speed it up, and MatMulNBits has no
        # Gather form; it stays FP32 (the untied output projection is the "head" unit).
        self.units: list[Unit] = [u for u in find_units(self.info.path) if u.name != "embeddings"]
        self.dev, self.test = lm_sequences(checkpoint, texts, settings)
        fp32 = self._decoder(self.info.path)
        self.reference = {"dev": teacher_forced(fp32, self.dev), "test": teacher_forced(fp32, self.test)}
        self._built: dict[tuple[str, frozenset[str]], Path] = {}

    def _decoder(self, path: Path) -> OrtDecoder:
        return OrtDecoder.for_checkpoint(ort_session(path, self.settings.threads), self.checkpoint)

    # -- plans -------------------------------------------------------------------------------

    def build(self, int8: frozenset[str], form: Form) -> Path:
        key = (form, int8)
        if key not in self._built:
            path = self.workdir / f"plan-{len(self._built)}.onnx"
            if not int8:
                path = self.info.path
            else:
                apply_plan(self.info.path, path, self.units, set(int8), form)
            self._built[key] = path
        return self._built[key]

    def evaluate(self, path: Path, split: str = "dev") -> tuple[float, float]:
        """(agreement with FP32, relative perplexity increase) on a held-out split."""
        data = self.dev if split == "dev" else self.test
        predictions, reference = teacher_forced(self._decoder(path), data), self.reference[split]
        return predictions.agreement(reference), float(np.exp(predictions.nll - reference.nll) - 1.0)

    def within_budget(self, agree: float, ppl_increase: float) -> bool:
        """On dev, the agreement's lower confidence bound must meet the budget: the search picks the
        largest plan that passes among noisy measurements, so a plan that passes by a hair on dev
        would miss it on held-out text as often as not."""
        s = self.settings
        positions = self.dev.ids.shape[0] * (self.dev.ids.shape[1] - self.dev.context)
        return (lower_bound(agree, positions, s.confidence_z) >= s.min_agreement - 1e-12
                and ppl_increase <= s.max_perplexity_increase + 1e-12)

    def step_latencies(self, paths: dict[str, Path | None], batch: int) -> tuple[dict[str, Timing], Quietness]:
        """Timings of one decode step at ``batch`` rows after a 64-token context, for several
        graphs (None: PyTorch eager FP32 through the toolkit's cache), timed interleaved
        (``quantizer.timing``) so that a burst of other work lands on all of them alike."""
        ids = np.tile(self.dev.ids[:1, :64], (batch, 1))
        mask = np.ones_like(ids)
        step_mask = np.ones((batch, ids.shape[1] + 1), np.int64)
        runners: dict[str, Callable[[], object]] = {}
        for name, path in paths.items():
            if path is None:
                runners[name] = self._torch_step(ids)
                continue
            decoder = self._decoder(path)
            cache = decoder.run(ids, mask, None)[1]
            runners[name] = functools.partial(decoder.run, ids[:, -1:], step_mask, cache)
        return measure(runners, self.settings.timing)

    def _torch_step(self, ids: np.ndarray) -> Callable[[], object]:
        model = self.checkpoint.model.eval()
        prompt = torch.from_numpy(ids)
        with torch.no_grad():
            cache = model.encode(prompt, torch.ones_like(prompt), use_cache=True).cache
        mask = torch.ones(prompt.shape[0], prompt.shape[1] + 1, dtype=torch.long)

        def step() -> object:
            with torch.no_grad():
                out = model.encode(prompt[:, -1:], mask, past=cache, use_cache=True)
                return model.target(out.hidden[:, -1], None)

        return step

    def batch_invariant(self, path: Path, steps: int = 16) -> bool:
        """Greedy tokens of each prompt alone equal its tokens inside a mixed, left-padded batch."""
        decoder = self._decoder(path)
        prompts = [self.dev.ids[i, : 8 + 12 * i].tolist() for i in range(min(4, len(self.dev.ids)))]
        together, _ = decoder.greedy(prompts, steps)
        return all(np.array_equal(decoder.greedy([p], steps)[0][0], together[i]) for i, p in enumerate(prompts))

    # -- sensitivity ---------------------------------------------------------------------------

    def sensitivity(self, form: Form) -> dict[str, tuple[float, float]]:
        """Per unit: (agreement with FP32, relative perplexity increase), simulated in PyTorch. A unit
        of layer k changes nothing below it, so each pass resumes from layer k's recorded input."""
        model = self.checkpoint.model.eval()
        head = model.target.decoder
        assert isinstance(head, torch.nn.Linear)
        rows = self.dev.ids[: self.settings.sensitivity_sequences]
        ids = torch.from_numpy(rows)
        mask = torch.ones_like(ids)
        scored = slice(self.dev.context - 1, rows.shape[1] - 1)
        targets = torch.from_numpy(rows[:, self.dev.context:]).flatten()
        with torch.no_grad():
            inputs: list[torch.Tensor] = []
            final = model.encoder(model.embedding(ids), mask, layer_inputs=inputs).hidden[:, scored]
            reference = head(final).flatten(0, 1)
            top, base = reference.argmax(-1), torch.nn.functional.cross_entropy(reference, targets)
            out = {}
            for unit in self.units:
                self._step(f"sensitivity of {unit.name}")
                with simulated_int8(unit_modules(model, unit.name, head), form):
                    if unit.name == "head":
                        hidden = final
                    else:
                        layer = int(unit.name.split(".")[0].removeprefix("layer"))
                        hidden = model.encoder(inputs[layer], mask, from_layer=layer).hidden[:, scored]
                    logits = head(hidden).flatten(0, 1)
                loss = torch.nn.functional.cross_entropy(logits, targets)
                out[unit.name] = (float((logits.argmax(-1) == top).float().mean()), float(torch.exp(loss - base) - 1))
        return out

    # -- the run ------------------------------------------------------------------------------

    def run(self) -> SampResult:
        s = self.settings
        notes: list[str] = []
        forms: list[Form] = ["blockwise"] if s.batch_invariant else ["blockwise", "dynamic"]
        if s.form != "auto":
            if s.batch_invariant and s.form == "dynamic":
                raise ValueError("form 'dynamic' is not batch-invariant: set batch_invariant=false to allow it")
            forms = [s.form]
        everything = frozenset(u.name for u in self.units)
        self._step("timing FP32 and all-INT8 decode steps (interleaved rounds)")
        timings, _ = self.step_latencies({"fp32": self.info.path, **{f: self.build(everything, f) for f in forms}}, 1)
        timed = {name: t.median_ms for name, t in timings.items()}
        fp32_ms = timed.pop("fp32")
        form = min(forms, key=timed.__getitem__)
        notes.append(f"decode step at batch 1: FP32 {fp32_ms:.2f} ms, all-INT8 "
                     + ", ".join(f"{f} {v:.2f} ms" for f, v in timed.items()) + f"; using {form}")
        saved = max(fp32_ms - timed[form], 0.0)
        total = sum(u.flops_per_token for u in self.units) or 1

        sens = self.sensitivity(form)
        measurements = [UnitMeasurement(u.name, 1.0 - sens[u.name][0], saved * u.flops_per_token / total)
                        for u in self.units]
        rows = [{"unit": u.name, "agreement": sens[u.name][0], "perplexity_increase": sens[u.name][1],
                 "gain_ms": saved * u.flops_per_token / total, "flops_per_token": u.flops_per_token}
                for u in self.units]
        # A unit that alone breaks the perplexity budget is never a candidate, whatever its agreement;
        # one that buys no speed is not worth any risk.
        order = [m.name for m in greedy_order(measurements)
                 if m.gain_ms > 0 and sens[m.name][1] <= s.max_perplexity_increase]
        verified: dict[frozenset[str], tuple[float, float]] = {}

        def fits(int8: frozenset[str]) -> bool:
            self._step(f"verifying a plan with {len(int8)} INT8 units on the real graph")
            verified[int8] = self.evaluate(self.build(int8, form))
            agree, ppl = verified[int8]
            notes.append(f"{len(int8)} units: agreement {agree:.4f}, perplexity {ppl:+.2%}: "
                         + ("within budget" if self.within_budget(agree, ppl) else "over budget"))
            return self.within_budget(agree, ppl)

        plan = plan_from(measurements, largest_fitting_prefix(order, fits) if order else frozenset())

        named = {"fp32": frozenset(), "all-int8": everything, "samp": plan.int8}
        paths = {name: self.build(chosen, form) for name, chosen in named.items()}
        self._step("timing the candidates and PyTorch eager (interleaved rounds)")
        latency, quiet = {}, []
        for b in s.latency_batches:
            latency[b], condition = self.step_latencies({TORCH: None, **paths}, b)
            quiet.append(condition)
        timing = combine(quiet, list(s.latency_batches))
        torch_ms = {b: latency[b][TORCH].median_ms for b in s.latency_batches}
        candidates = []
        for name, chosen in named.items():
            self._step(f"measuring candidate {name}")
            dev_agree, dev_ppl = verified.get(chosen) or self.evaluate(paths[name])
            test_agree, test_ppl = self.evaluate(paths[name], "test")
            candidates.append(Candidate(
                name=name, mode="fp32" if not chosen else form, int8=sorted(chosen),
                quantization_rate=quantization_rate(self.units, set(chosen)), dev_metric=dev_agree,
                test_metric=test_agree, latency_ms={b: latency[b][name].median_ms for b in s.latency_batches},
                speedup_vs_torch=paired_ratio(latency[1][TORCH], latency[1][name]) if timing.quiet else None,
                size_bytes=paths[name].stat().st_size,
                perplexity_increase={"dev": dev_ppl, "test": test_ppl},
                batch_invariant=self.batch_invariant(paths[name]),
            ))
        chosen_row = candidates[-1]
        assert chosen_row.test_metric is not None and chosen_row.perplexity_increase is not None
        kept = sorted(everything - plan.int8)
        test_ok = (chosen_row.test_metric >= s.min_agreement
                   and chosen_row.perplexity_increase["test"] <= s.max_perplexity_increase)
        verdict = (f"{len(plan.int8)} of {len(self.units)} units in INT8 ({form}); kept FP32: "
                   f"{', '.join(kept) or 'none'}. Next-token agreement with FP32 {chosen_row.dev_metric:.4f} dev / "
                   f"{chosen_row.test_metric:.4f} test, perplexity {chosen_row.perplexity_increase['test']:+.2%} "
                   f"on test: the budget (agreement >= {s.min_agreement}, perplexity <= "
                   f"{s.max_perplexity_increase:+.0%}) is {'met' if test_ok else 'MISSED'} on held-out test text; "
                   f"decode step {chosen_row.latency_ms[1]:.2f} ms at batch 1 ("
                   + (f"{chosen_row.speedup_vs_torch:.2f}x PyTorch eager" if chosen_row.speedup_vs_torch is not None
                      else f"no speed ratio: the machine was busy, {timing.reason}")
                   + "); batch-invariant: "
                   f"{'yes' if chosen_row.batch_invariant else 'NO'}.")
        report = SampReport(
            task="generation", metric="next_token_agreement",
            budget={"min_agreement": s.min_agreement, "max_perplexity_increase": s.max_perplexity_increase},
            units=rows, torch_eager_ms=torch_ms, candidates=candidates, chosen="samp", verdict=verdict,
            export_max_abs_diff=self.info.max_abs_diff, mode=form, notes=notes, kept_fp32=kept,
            timing=timing, provenance=host_info(s.threads),
        )
        return SampResult(report=report, model_path=self.build(plan.int8, form), workdir=self.workdir)

    def _step(self, text: str) -> None:
        if self.progress is not None:
            self.progress.console.print(f"[dim]·[/] {text}")


__all__ = ["DecoderSamp", "DecoderSampSettings", "simulated_int8"]
