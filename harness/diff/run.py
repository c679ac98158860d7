"""A model diff, end to end: files, weights, behaviour and localization of OLD vs NEW.

Models load one at a time (OLD, then NEW) through the same ``ModelPool`` the
suites use; everything NEW is compared with is kept from OLD's turn in float32 on
the CPU: its greedy paths and log-probs (the ``drift`` check's functions) and its
per-module activations.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from harness.diff.files import FileChange, diff_folders
from harness.judge.localize import ModuleDiff, compare_modules, describe, first_change, merge_worst
from harness.diff.prompts import SuitePrompt
from harness.diff.weights import Side, WeightsDiff, diff_weights
from harness.models.sources import ResolvedModel

Progress = Callable[[str], None]


@dataclass(frozen=True)
class DiffSide:
    """One side of the diff: a label, the resolved model and (optionally) an adapter."""

    label: str
    resolved: ResolvedModel

    @property
    def adapter(self) -> Path | None:
        return self.resolved.adapter

    @property
    def weights(self) -> Side:
        return Side(self.resolved.path, self.adapter)


@dataclass
class PromptResult:
    id: str
    tokens_same: bool
    prompt_tokens: int
    new_tokens: int
    mean_kl: float | None  # None: not measured (the vocabularies differ, so next-token KL is not defined)
    max_kl: float | None
    top1_agreement: float | None
    first_divergence: dict[str, Any] | None
    first_changed_module: str | None

    @property
    def measured(self) -> bool:
        """Whether next-token distributions and the greedy path were compared (not with vocabularies apart)."""
        return self.mean_kl is not None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class ModelDiff:
    old: DiffSide
    new: DiffSide
    files: list[FileChange]
    weights: WeightsDiff
    prompts: list[PromptResult] = field(default_factory=list)
    modules: list[ModuleDiff] = field(default_factory=list)
    noise_method: str = ""
    notes: list[str] = field(default_factory=list)
    dtype: str = ""
    device: str = ""

    @property
    def tokenizer_changed_prompts(self) -> list[str]:
        return [p.id for p in self.prompts if not p.tokens_same]

    @property
    def first_change(self) -> ModuleDiff | None:
        return first_change(self.modules)

    @property
    def localization(self) -> str:
        if not self.prompts:
            return "not measured (no prompts)"
        first = self.first_change
        text = describe(first.name if first else None, tokenizer_changed=bool(self.tokenizer_changed_prompts))
        exact = self.first_difference
        if first is None and exact is not None and not self.tokenizer_changed_prompts:
            where = describe(exact.name).removeprefix("behaviour first changes ")
            text += f"; the first (sub-noise) difference is {where}"
        return text

    @property
    def first_difference(self) -> ModuleDiff | None:
        """The first module whose output differs at all (same device, same kernels: upstream is bit-equal)."""
        return next((m for m in self.modules if not m.relative == 0.0), None)

    def behaviour_totals(self) -> dict[str, Any]:
        """Totals over the prompts whose distributions were compared; None where none were (never a 0 that
        reads as "no divergence")."""
        measured = [p for p in self.prompts if p.measured]
        positions = [p.prompt_tokens + p.new_tokens - 1 for p in measured]
        total = sum(positions) or 1
        return {
            "prompts": len(self.prompts),
            "measured_prompts": len(measured),
            "mean_kl": sum(p.mean_kl * n for p, n in zip(measured, positions)) / total if measured else None,
            "top1_agreement": (sum(p.top1_agreement * n for p, n in zip(measured, positions)) / total
                               if measured else None),
            "greedy_diverged": sum(1 for p in measured if p.first_divergence is not None) if measured else None,
        }

    @property
    def unchanged(self) -> bool:
        return (not self.files and self.weights.identical and not self.tokenizer_changed_prompts
                and self.first_change is None)


def diff_files(old: DiffSide, new: DiffSide) -> list[FileChange]:
    """Model folders, then adapters (an adapter present on one side only is named)."""
    changes = diff_folders(old.resolved.path, new.resolved.path)
    if old.adapter and new.adapter:
        changes += [dataclasses.replace(c, file=f"adapter/{c.file}") for c in diff_folders(old.adapter, new.adapter)]
    elif old.adapter or new.adapter:
        which = new.adapter or old.adapter
        status = "added" if new.adapter else "removed"
        changes.append(FileChange(f"adapter ({which})", "adapter", status, [f"LoRA adapter {which} was {status}"]))
    return changes


def run_diff(old: DiffSide, new: DiffSide, *, prompts: list[SuitePrompt], device: Any, quant: str = "fp16",
             new_tokens: int = 8, progress: Progress = lambda _: None) -> ModelDiff:
    """Files and weights (no model loaded), then OLD's turn, then NEW's turn."""
    progress("comparing files")
    files = diff_files(old, new)
    progress("comparing weights (streamed)")
    weights = diff_weights(old.weights, new.weights)
    result = ModelDiff(old, new, files, weights, device=device.description)
    if prompts:
        _behaviour(result, prompts, device=device, quant=quant, new_tokens=new_tokens, progress=progress)
    return result


def _behaviour(result: ModelDiff, prompts: list[SuitePrompt], *, device: Any, quant: str, new_tokens: int,
               progress: Progress) -> None:
    from harness.measure.drift import DriftReference, compare_to_reference, reference_observation
    from harness.observe.activations import capture
    from harness.models.introspect import compute_dtype
    from harness.models.pool import ModelPool
    from harness.models.variants import VariantSpec

    progress(f"loading OLD ({result.old.label})")
    pool = ModelPool(result.old.resolved, device)
    model = pool.get(VariantSpec(quant, result.old.adapter is not None)).model  # type: ignore[arg-type]
    prompts, old_ids = _encodable(prompts, pool.tokenizer, progress)
    if not prompts:
        pool.release()
        return
    reference = reference_observation(model, pool.tokenizer, old_ids, new_tokens, variant="OLD")
    result.dtype = compute_dtype(model)
    old_vocab = _vocab_size(model)
    old_acts = [capture(model, seq) for seq in reference.sequences]
    noise, result.noise_method = _noise(model, reference.sequences, old_acts)
    pool.release()
    del model, pool

    progress(f"loading NEW ({result.new.label})")
    pool = ModelPool(result.new.resolved, device)
    model = pool.get(VariantSpec(quant, result.new.adapter is not None)).model  # type: ignore[arg-type]
    new_vocab = _vocab_size(model)
    if new_vocab != old_vocab:
        result.notes.append(f"vocabulary sizes differ (OLD {old_vocab}, NEW {new_vocab}): next-token KL and "
                            "top-1 agreement are not defined; activations are compared up to the head")
    runs: list[list[ModuleDiff]] = []
    for index, prompt in enumerate(prompts):
        sequence = reference.sequences[index]
        if max(sequence) >= new_vocab:
            result.notes.append(f"{prompt.id}: OLD's token ids go past NEW's vocabulary; not run on NEW")
            continue
        rows = compare_modules(old_acts[index], capture(model, sequence), noise[index], result.dtype)
        runs.append(rows)
        first = first_change(rows)
        row = PromptResult(
            id=prompt.id, tokens_same=_encode_or_none(prompt, pool.tokenizer) == old_ids[index],
            prompt_tokens=reference.prompt_lengths[index], new_tokens=len(sequence) - reference.prompt_lengths[index],
            mean_kl=None, max_kl=None, top1_agreement=None, first_divergence=None,
            first_changed_module=first.name if first else None,
        )
        if new_vocab == old_vocab:
            one = DriftReference("OLD", (sequence,), reference.prompt_lengths[index:index + 1],
                                 reference.logprobs[index:index + 1])
            stats = compare_to_reference(model, one, variant="NEW")
            div = stats.first_divergence
            row.mean_kl, row.max_kl, row.top1_agreement = stats.mean_kl, stats.max_kl, stats.top1_agreement
            row.first_divergence = None if div is None else {
                "new_token": div.new_token, "expected": div.expected, "got": div.got,
                "expected_text": pool.tokenizer.decode([div.expected]), "got_text": pool.tokenizer.decode([div.got])}
        result.prompts.append(row)
    result.modules = merge_worst(runs)
    pool.release()


def _encodable(prompts: list[SuitePrompt], tokenizer: Any,
               progress: Progress) -> tuple[list[SuitePrompt], list[list[int]]]:
    """The prompts OLD can encode (a chat prompt needs a chat template), with their ids."""
    kept: list[SuitePrompt] = []
    ids: list[list[int]] = []
    for prompt in prompts:
        encoded = _encode_or_none(prompt, tokenizer)
        if encoded is None:
            progress(f"skipping {prompt.id}: OLD's tokenizer has no chat template for its messages, or its template "
                     "refuses them")
            continue
        kept.append(prompt)
        ids.append(encoded)
    return kept, ids


def _encode_or_none(prompt: SuitePrompt, tokenizer: Any) -> list[int] | None:
    from harness.observe.prompts import NoChatTemplate, TemplateRefusal

    try:
        return prompt.encode(tokenizer)
    except (NoChatTemplate, TemplateRefusal):
        return None


def _vocab_size(model: Any) -> int:
    from harness.models.introspect import base_model

    return int(base_model(model).get_input_embeddings().num_embeddings)


def _noise(model: Any, sequences: Any, reference: list[dict[str, Any]]) -> tuple[list[dict[str, float]], str]:
    """Per prompt and module: how far OLD moves when only its attention kernel changes."""
    from harness.observe.activations import capture, relative_difference
    from harness.models.introspect import KernelSwitchError, other_attention
    from harness.judge.noise import finite_or_zero

    try:
        with other_attention(model) as method:
            noise = []
            for seq, acts in zip(sequences, reference):
                again = capture(model, seq)
                noise.append({name: finite_or_zero(relative_difference(acts[name], again[name]))
                              for name in acts if name in again})
    except KernelSwitchError as exc:  # no second kernel: fall back to the dtype floor alone
        return [{} for _ in sequences], f"dtype floor only: {exc}"
    return noise, f"OLD run twice, attention kernel {method}"

