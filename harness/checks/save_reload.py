"""``save_reload``: ``save_pretrained`` then reload gives the same outputs, bit for bit.

What a user ships is what ``save_pretrained`` wrote, not the model in memory. A
tensor that is not saved (a tied or renamed weight, a buffer, a quantization
state), saved in another dtype, or an adapter saved without one of its
modules, is silently re-initialized or dropped on reload, with at most a
warning. Per variant: the 16-bit model is saved and reloaded; the NF4 model
is saved quantized and reloaded (a save that raises, e.g. a bitsandbytes
without 4-bit serialization, leaves the item NOT JUDGED with the real error:
never a pass, never a plain skip); for adapter variants the
adapter is saved and loaded again onto a copy of the same base. Missing,
unexpected or mismatched keys on reload fail by name; then greedy outputs of
the original and the reloaded model are judged by the comparison engine,
exactly by default (same weights, same kernels, same machine), or within
noise with ``match: noise``. The pool's loaded model is never modified.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from harness.checks.base import Check, CheckContext, register_check
from harness.checks.consistency import (
    ConsistencySpec, Findings, encoded_prompts, exact_tolerance, greedy, judge_run, tolerance_for,
)
from harness.errors import AdapterError, CheckFailure, NotJudged


class SaveReloadSpec(ConsistencySpec):
    """`save_pretrained` then reload must give the same outputs: missing, unexpected or mismatched keys fail by
    name, then greedy outputs are compared (adapter variants: the adapter is saved and reloaded)."""

    kind: Literal["save_reload"]
    match: Literal["exact", "noise"] = Field("exact", description=(
        "`exact`: bit-identical outputs (same weights, kernels and machine); `noise`: within `tolerance`."))

    def ignored(self) -> dict[str, str]:
        if self.match == "exact" and self.tolerance is not None:
            return {"tolerance": "match: exact (the default) requires bit-identical runs, so no tolerance applies; "
                                 "set `match: noise` to judge within this tolerance, or remove it"}
        return {}


@register_check("save_reload")
class SaveReloadCheck(Check[SaveReloadSpec]):
    Spec = SaveReloadSpec

    def run(self, ctx: CheckContext) -> None:
        __tracebackhide__ = True
        from harness.judge.compare import sides

        named = sides("original", "reloaded")

        assert ctx.variant is not None
        model, tokenizer = ctx.model, ctx.tokenizer
        prompts = encoded_prompts(ctx, self.spec)
        before = [greedy(model, tokenizer, p, self.spec.max_new_tokens) for p in prompts]
        with tempfile.TemporaryDirectory(prefix="harness-save-reload-") as folder:
            what = "adapter" if ctx.variant.lora else f"{ctx.variant.quant} model"
            reloaded = (reload_adapter(ctx, model, Path(folder)) if ctx.variant.lora
                        else reload_model(ctx, model, Path(folder)))
            tol = exact_tolerance() if self.spec.match == "exact" else tolerance_for(ctx, self.spec)
            findings = Findings(self.spec.id, tokenizer)
            for prompt, reference in zip(prompts, before):
                findings.add(f"prompt {prompt.label}, reloaded {what} vs the one saved",
                             judge_run(reference, reloaded, tokenizer, prompt, self.spec.max_new_tokens, tol,
                                       sides=named, one_pass=self.spec.match != "exact"), named)
            del reloaded
        findings.finish(
            ctx, headline=f"the {what} reloaded from save_pretrained does not behave like the one saved", tol=tol,
            fix="Something the model needs was not saved, or was saved differently (a tensor left out, tied "
                "weights untied, a dtype or quantization state lost). Compare the saved keys with the "
                "model's state_dict.",
        )


def reload_model(ctx: CheckContext, model: Any, folder: Path) -> Any:
    """Save the (base or NF4) model and load it back the way the pool loads models."""
    __tracebackhide__ = True
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model.save_pretrained(folder)
    except Exception as exc:  # noqa: BLE001 - bitsandbytes versions without 4-bit serialization
        if ctx.variant is not None and ctx.variant.quant == "nf4":
            raise NotJudged(f"{ctx.subject}: saving the NF4 model raised, so its reload was not judged: "
                            f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}. A bitsandbytes "
                            "without 4-bit serialization cannot ship NF4 weights: upgrade it, or leave nf4 out "
                            "of this check's `variants:`") from None
        raise
    entry = ctx.pool.resolved.entry
    reloaded, info = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=getattr(torch, ctx.pool.resolved.half.dtype), device_map=ctx.device.name,
        trust_remote_code=entry.trust_remote_code, output_loading_info=True,
        # the same kernel as the model saved: a kernel swap is noise, not a serialization fault
        attn_implementation=getattr(model.config, "_attn_implementation", None),
    )
    problems = {k: sorted(map(str, v)) for k, v in info.items() if v}
    if problems:
        raise CheckFailure(
            f"reloading the model saved by save_pretrained ({folder.name}) reports "
            + "; ".join(f"{kind.replace('_', ' ')}: {', '.join(keys[:8])}" + (f" (+{len(keys) - 8} more)"
                        if len(keys) > 8 else "") for kind, keys in problems.items())
            + ". Those weights were re-initialized or ignored on reload, so the saved model is not the one "
            "tested. Fix: make sure save_pretrained writes every tensor of the state_dict (tied weights, "
            "buffers, quantization state)."
        )
    reloaded.eval()
    return reloaded


def reload_adapter(ctx: CheckContext, model: Any, folder: Path) -> Any:
    """Save the adapter alone and load it onto a copy of the same base, as a user would."""
    __tracebackhide__ = True
    from harness.models.adapters import load_adapter

    # "auto" asks the Hub whether the base's vocabulary changed: a network lookup (and a warning)
    # offline. The in-memory base is reused below, so only a LoRA on the embedding needs saving.
    model.save_pretrained(folder, save_embedding_layers=_embedding_is_adapted(model))
    base = copy.deepcopy(model).unload()
    try:
        reloaded = load_adapter(base, folder, model_name=ctx.pool.resolved.name)
    except AdapterError as exc:
        raise CheckFailure(f"the adapter saved by save_pretrained does not load back: {exc}") from None
    reloaded.eval()
    return reloaded


def _embedding_is_adapted(model: Any) -> bool:
    """Whether a LoRA layer wraps an embedding (peft then saves the embedding with the adapter)."""
    from peft.tuners.lora import Embedding

    return any(isinstance(module, Embedding) for module in model.modules())
