"""Writes docs/nf4-merge.md: the ways to merge a LoRA adapter into a 16-bit and an NF4 base, measured.

    python docs/nf4-merge.py [--model NAME] [--out docs/nf4-merge.md]

For each adapter variant (fp16-lora, nf4-lora) of the model: the unmerged adapter's greedy
tokens on a few prompts are scored through each merged copy (``lora_merge``'s own
``judge_path``) and through the base with the adapter switched off (what the whole adapter
does). Then, on the NF4 base, why re-quantizing loses the adapter: how many NF4 codes the
LoRA deltas change, how large a delta is next to an NF4 level gap, and how much of each delta
survives the rounding. Everything comes from the harness's own code, so the page is rewritten,
not edited, when the code or the libraries change.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

PROMPTS = (
    ("chat", "Create a funny joke about chickens."),
    ("chat", "Tell me about the sea."),
    ("chat", "Give me one tip for staying healthy."),
    ("raw", "The capital of France is"),
)
NEW_TOKENS = 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--out", default=str(Path(__file__).with_name("nf4-merge.md")))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    Path(args.out).write_text(report(args.model), encoding="utf-8")
    print(f"wrote {args.out}")


def report(model_name: str | None) -> str:
    from harness.checks.consistency import Prompt
    from harness.checks.lora_merge import adapter_effect, judge_path
    from harness.observe.prompts import Message, encode_prompt
    from harness.judge.tolerance import NoiseModel
    from harness.models.devices import pick_device
    from harness.observe.observation import observe_greedy
    from harness.models.pool import ModelPool
    from harness.models.machine import library_versions
    from harness.models.quantized import MERGE_PATH_NAMES, MERGE_PATHS
    from harness.models.registry import load_registry
    from harness.models.sources import resolve
    from harness.models.variants import VariantSpec

    root = Path(__file__).resolve().parents[1]
    resolved = resolve(model_name, registry=load_registry(root / "models.yaml"), rootdir=root, adapter=None,
                       progress=lambda _: None)
    pool = ModelPool(resolved=resolved, device=pick_device("cpu"), attn_implementation=None)
    tokenizer = pool.tokenizer
    prompts = [Prompt(text, encode_prompt(tokenizer, prompt=text if kind == "raw" else None,
                                          messages=[Message(role="user", content=text)] if kind == "chat" else None))
               for kind, text in PROMPTS]
    cells: dict[tuple[str, str], str] = {}
    rows = [*MERGE_PATHS, "off"]
    for key in ("fp16-lora", "nf4-lora"):
        variant = VariantSpec.from_key(key)
        model = pool.get(variant).model
        tol = NoiseModel().tolerance(key)
        unmerged = [observe_greedy(model, tokenizer, p.ids, NEW_TOKENS) for p in prompts]
        effect = adapter_effect(model, tokenizer, prompts, unmerged)
        cells[("off", key)] = f"{effect:.3g}"
        cells[("noise", key)] = f"{tol.mean_abs_dlogp:g}"
        for path in MERGE_PATHS if variant.quant == "nf4" else ("merge_and_unload",):
            result = judge_path(model, tokenizer, path, prompts, unmerged, tol=tol, max_new_tokens=NEW_TOKENS)
            verdict = "within noise" if result.within_noise else "**not** within noise"
            cells[(path, key)] = (f"{result.mean:.3g} (max {result.worst:.3g}; {result.lost(effect):.2f} of the "
                                  f"adapter lost; {verdict})")
        if variant.quant == "nf4":
            rounding = rounding_figures(model)
    names = {"merge_and_unload": "`merge_and_unload()` (on NF4, peft re-quantizes the merged layers)",
             "requantize": MERGE_PATH_NAMES["requantize"], "dequantize": MERGE_PATH_NAMES["dequantize"],
             "off": "no adapter at all (the adapter's whole effect)"}
    no_quant = "– (nothing to dequantize: the same as `merge_and_unload()`)"
    lines = [
        "# Merging a LoRA adapter into an NF4 base",
        "",
        f"Written by `python docs/nf4-merge.py` ({resolved.name}, its adapter, CPU; "
        + ", ".join(f"{k} {v}" for k, v in library_versions().items()) + ").",
        "",
        f"Mean |Δ log p| of the unmerged adapter's greedy tokens ({len(prompts)} prompts x {NEW_TOKENS} tokens), "
        "scored through each merged copy against the same tokens scored through the unmerged adapter, one "
        "forward pass each; \"within "
        "noise\" is the comparison engine's verdict on the merged copy's own greedy output, under the "
        "variant's tolerance (for the re-quantizing merges, which `nf4_budget` judges, the verdict of the "
        "one-pass scores: what greedy decoding would do until its first differing token).",
        "",
        "| merge path | fp16 base (fp16-lora) | NF4 base (nf4-lora) |",
        "|---|---|---|",
    ]
    for row in rows:
        fp16 = cells.get((row, "fp16-lora"), no_quant if row in ("requantize", "dequantize") else "")
        lines.append(f"| {names[row]} | {fp16} | {cells[(row, 'nf4-lora')]} |")
    lines.append(f"| the variant's noise (tolerance, mean) | {cells[('noise', 'fp16-lora')]} | "
                 f"{cells[('noise', 'nf4-lora')]} |")
    lines += [
        "",
        "Why re-quantizing loses the adapter, on the NF4 base's LoRA-targeted layers "
        f"({rounding['layers']} layers, {rounding['weights']:,} weights):",
        "",
        f"- a LoRA delta is on average {rounding['delta_over_half_gap']:.3f} of half the gap between two NF4 levels "
        "of its block (round-to-nearest moves a weight only past half a gap);",
        f"- adding the deltas and quantizing again changes the NF4 code of {100 * rounding['codes_changed']:.2f}% "
        "of the weights;",
        f"- of each layer's delta, {100 * rounding['kept_mean']:.1f}% survives the rounding on average (projection of "
        f"the applied change on the delta; {100 * rounding['kept_min']:.1f}% to {100 * rounding['kept_max']:.1f}% "
        "per layer).",
        "",
    ]
    return "\n".join(lines)


def rounding_figures(model: object) -> dict[str, float]:
    """How the deltas of a peft model's LoRA layers on 4-bit bases fare when the sum is quantized again."""
    import bitsandbytes.functional as bnbf
    import torch
    from peft.tuners.lora import LoraLayer

    from harness.models.quantized import dequantized_weight, is_4bit

    layers = weights = changed = 0
    ratios: list[float] = []
    kept: list[float] = []
    for layer in model.modules():  # type: ignore[attr-defined]
        if not isinstance(layer, LoraLayer) or not is_4bit(layer.get_base_layer()):
            continue
        base = layer.get_base_layer()
        state = base.weight.quant_state
        w0 = dequantized_weight(base)
        delta = sum(layer.get_delta_weight(a).float() for a in layer.active_adapters if a in layer.lora_A)

        def codes(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            packed, qs = bnbf.quantize_4bit(w.to(state.dtype), blocksize=state.blocksize, quant_type=state.quant_type,
                                            compress_statistics=base.weight.compress_statistics)
            flat = packed.view(-1)
            return torch.stack([flat >> 4, flat & 15], 1).view(-1), bnbf.dequantize_4bit(packed, qs).float()

        before, _ = codes(w0)
        after, w1 = codes(w0 + delta)
        layers += 1
        weights += w0.numel()
        changed += int((before != after).sum())
        block = state.blocksize
        absmax = w0.reshape(-1, block).abs().amax(1, keepdim=True)
        ratios.append(float((delta.reshape(-1, block).abs() / (absmax / 15)).mean()))  # 16 levels over [-1, 1]
        d = delta.reshape(-1)
        kept.append(float(((w1 - w0).reshape(-1) @ d) / (d @ d)))
    return {"layers": layers, "weights": weights, "codes_changed": changed / max(weights, 1),
            "delta_over_half_gap": sum(ratios) / len(ratios), "kept_mean": sum(kept) / len(kept),
            "kept_min": min(kept), "kept_max": max(kept)}


if __name__ == "__main__":
    main()
