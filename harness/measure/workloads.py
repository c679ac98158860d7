"""What runs while memory or time is measured: exact-length greedy generation on fixed inputs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Shape:
    """A throughput shape: ``batch`` rows of ``prompt_tokens`` tokens, ``new_tokens`` generated."""

    batch: int
    prompt_tokens: int
    new_tokens: int

    def __str__(self) -> str:
        return f"batch {self.batch} x {self.prompt_tokens} prompt tokens -> {self.new_tokens} new"


def model_device(model: Any) -> Any:
    return next(model.parameters()).device


_FILLER = (
    "The quick brown fox jumps over the lazy dog while the harbour bells ring across the "
    "water, and a small boat carries letters, bread and news from one island to the next. "
)


def synthetic_prompt_ids(tokenizer: Any, n_tokens: int) -> list[int]:
    """Exactly ``n_tokens`` ids of ordinary English text (no padding, no special tokens)."""
    ids = list(tokenizer(_FILLER, add_special_tokens=False)["input_ids"])
    if not ids:
        raise ValueError("the tokenizer turned the filler text into no tokens")
    return [ids[i % len(ids)] for i in range(n_tokens)]


def encode_batch(tokenizer: Any, texts: Sequence[str], *, device: Any) -> dict[str, Any]:
    """Left-padded batch (decoder-only models generate from the right edge)."""
    enc = tokenizer(list(texts), return_tensors="pt", padding=True, padding_side="left")
    return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}


def generate_exact(model: Any, tokenizer: Any, inputs: Mapping[str, Any], new_tokens: int,
                   *, logits_processor: Any = None) -> Any:
    """Greedy generation of exactly ``new_tokens`` tokens per row (eos cannot stop it)."""
    import torch

    extra = {"logits_processor": logits_processor} if logits_processor is not None else {}
    with torch.inference_mode():
        return model.generate(
            **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
            num_beams=1, temperature=None, top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id,
            **extra,
        )


def run_workload(model: Any, tokenizer: Any, prompts: Sequence[str], *, batch_size: int,
                 max_new_tokens: int) -> int:
    """The memory workload: prompts in batches of ``batch_size`` (cycled to fill the last)."""
    device = model_device(model)
    batches = max(1, -(-len(prompts) // batch_size))
    rows = [prompts[i % len(prompts)] for i in range(batches * batch_size)]
    generated = 0
    for start in range(0, len(rows), batch_size):
        inputs = encode_batch(tokenizer, rows[start:start + batch_size], device=device)
        out = generate_exact(model, tokenizer, inputs, max_new_tokens)
        generated += int(out.shape[0]) * (int(out.shape[1]) - int(inputs["input_ids"].shape[1]))
    return generated


def throughput_inputs(model: Any, tokenizer: Any, shape: Shape) -> dict[str, Any]:
    import torch

    ids = torch.tensor([synthetic_prompt_ids(tokenizer, shape.prompt_tokens)] * shape.batch,
                       device=model_device(model))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
