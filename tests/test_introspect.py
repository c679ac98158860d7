"""The one rule for the dtype a model computes in (``harness.models.introspect``).

An NF4 model holds its unquantized parts in float16 but multiplies in bfloat16: noise floors
follow the compute dtype, and a plain layer that replaces a 4-bit one takes the activation dtype.
"""

from __future__ import annotations

from typing import Any

import pytest

from harness.models.introspect import activation_dtype, base_model, compute_dtype

torch = pytest.importorskip("torch")


def test_an_nf4_model_computes_in_its_4bit_compute_dtype_not_its_embedding_dtype(tiny_nf4_lora: Any) -> None:
    pytest.importorskip("bitsandbytes")
    assert activation_dtype(tiny_nf4_lora) == torch.float16
    assert compute_dtype(tiny_nf4_lora) == "bfloat16"
    assert base_model(tiny_nf4_lora) is tiny_nf4_lora.get_base_model()


def test_a_16bit_model_computes_in_its_embedding_dtype() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    assert base_model(model) is model
    assert activation_dtype(model) == torch.bfloat16
    assert compute_dtype(model) == "bfloat16"
