"""``harness.models.quantized`` on a tiny NF4 model with a random LoRA: merges and the float32 copy, no trained model.

The three merge paths are the same function up to rounding except where re-quantization
rounds the delta away; the 16-bit merge must match the unmerged adapter, and the model the
paths start from must come out untouched.
"""

from __future__ import annotations

import pytest
import torch


def _logits(model, ids=(1, 5, 9, 17, 33)):
    with torch.inference_mode():
        return model(input_ids=torch.tensor([list(ids)])).logits.float()


def _has_4bit_layers(model) -> bool:
    from harness.models.quantized import is_4bit

    return any(is_4bit(m) for m in model.modules())


def test_the_16bit_merge_matches_the_adapter_and_requantizing_rounds_the_delta_away(tiny_nf4_lora):
    from harness.models.quantized import is_4bit, merged

    unmerged = _logits(tiny_nf4_lora)
    with tiny_nf4_lora.disable_adapter():
        base = _logits(tiny_nf4_lora)
    effect = (unmerged - base).abs().mean()
    out = {path: merged(tiny_nf4_lora, path) for path in ("merge_and_unload", "requantize", "dequantize")}
    gap = {path: float((_logits(m) - unmerged).abs().mean() / effect) for path, m in out.items()}
    assert gap["dequantize"] < 0.1  # the same function up to rounding
    assert gap["merge_and_unload"] > 0.5 and gap["requantize"] > 0.5  # most of the delta rounded away
    assert abs(gap["merge_and_unload"] - gap["requantize"]) < 0.2  # peft's path is the plain re-quantization
    assert not _has_4bit_layers(out["dequantize"].model.layers[0].self_attn.q_proj)
    assert is_4bit(out["requantize"].model.layers[0].self_attn.q_proj)
    # the model the merges started from is untouched: still the adapter, still 4-bit
    assert torch.equal(_logits(tiny_nf4_lora), unmerged) and _has_4bit_layers(tiny_nf4_lora)


def test_float32_copy_dequantizes_and_agrees(tiny_nf4_lora):
    from harness.models.quantized import float32_copy

    copy = float32_copy(tiny_nf4_lora)
    assert not _has_4bit_layers(copy) and all(p.dtype == torch.float32 for p in copy.parameters())
    reference = _logits(tiny_nf4_lora)
    assert float((_logits(copy) - reference).abs().max()) < 0.05 * float(reference.abs().max())
    assert _has_4bit_layers(tiny_nf4_lora)
