"""peft's merge_and_unload() into an NF4 base damages the model once bitsandbytes has repacked it for the CPU.

Run: python -m harness.upstream.peft_merge_cpu_packed --model MODEL_DIR --adapter LORA_DIR

Where the CPU has AVX512-BF16, bitsandbytes (0.45 and later) repacks every 4-bit weight at the
first inference forward (``bitsandbytes.functional._convert_weight_packed_for_cpu``: nibbles
reordered for its fused kernel, the double-quantized absmax undone into bfloat16,
``quant_state.packing_format_for_cpu = True``). peft's ``merge_and_unload()`` then dequantizes
those weights as if they were in the plain layout and writes the result back: the merged model
answers with garbage. Merged before any forward pass, the same model is fine. On a CPU without
AVX512-BF16 this script applies the repack itself (exactly as bitsandbytes' forward would), so
the defect reproduces on any machine.

Imports only torch, transformers, peft and bitsandbytes.
"""

from __future__ import annotations

import argparse
import copy


def _repack(model) -> int:
    """What ``Linear4bit.forward`` does on the first inference forward on a CPU with AVX512-BF16."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and not getattr(module.weight.quant_state,
                                                                 "packing_format_for_cpu", False):
            module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu(
                module.weight.data, module.weight.quant_state)
            count += 1
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a causal LM folder (safetensors)")
    parser.add_argument("--adapter", required=True, help="a LoRA adapter folder for it")
    parser.add_argument("--prompt", default="The capital of France is")
    args = parser.parse_args(argv)

    import torch
    from bitsandbytes.functional import has_avx512bf16
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.model)
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float16, quantization_config=nf4,
                                                device_map="cpu")
    model = PeftModel.from_pretrained(base, args.adapter).eval()
    ids = tok(args.prompt, return_tensors="pt").input_ids

    def next_token(m) -> torch.Tensor:
        with torch.inference_mode():
            return torch.log_softmax(m(input_ids=ids).logits[0, -1].float(), -1)

    def top(logp: torch.Tensor) -> list[str]:
        return [tok.decode([int(i)]) for i in logp.topk(3).indices]

    before_forward = copy.deepcopy(model).merge_and_unload()  # merged in the plain layout
    unmerged = next_token(model)  # on an AVX512-BF16 CPU this forward repacks the weights
    fused = bool(has_avx512bf16())
    if not fused:
        print(f"this CPU has no AVX512-BF16: repacking {_repack(model)} layers as bitsandbytes' forward would there")
    after_forward = copy.deepcopy(model).merge_and_unload()
    good, bad = next_token(before_forward), next_token(after_forward)
    print(f"torch / bitsandbytes: {torch.__version__} / {__import__('bitsandbytes').__version__}; "
          f"peft {__import__('peft').__version__}")
    print(f"unmerged adapter, next-token top 3:         {top(unmerged)}")
    print(f"merged before any forward (plain layout):   {top(good)}  mean |Δ log p| vs unmerged "
          f"{float((good - unmerged).abs().mean()):.3f}")
    print(f"merged after a forward (CPU-packed layout): {top(bad)}  mean |Δ log p| vs unmerged "
          f"{float((bad - unmerged).abs().mean()):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
