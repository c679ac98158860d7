"""bench/forward_log.py logs each outermost causal-LM forward once; bench/forward_floor.py sums and fits them.

The behaviour does not depend on a trained model: a tiny random Llama stands in.
"""

from __future__ import annotations

import json

import pytest

from conftest import bench_module


@pytest.fixture()
def tiny():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=1100, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2)).eval()


def test_the_log_counts_a_wrapped_model_once_with_its_shape_and_kind(tiny, tmp_path):
    import torch
    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

    log = bench_module("forward_log")
    out = (tmp_path / "log.jsonl").open("w")
    log._STATE.update(item="suite::check[fp16]", depth=0, out=out)

    class WrapperForCausalLM(torch.nn.Module):  # a wrapper whose name also ends in ForCausalLM, as peft's does
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids=None, attention_mask=None):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    pre = register_module_forward_pre_hook(log._pre)
    post = register_module_forward_hook(log._post, with_kwargs=True, always_call=True)
    try:
        with torch.inference_mode():
            ids = torch.ones(3, 5, dtype=torch.long)
            WrapperForCausalLM(tiny)(input_ids=ids, attention_mask=ids)
            tiny(input_ids=ids[:1, :2])
    finally:
        pre.remove()
        post.remove()
        out.close()
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["shape"] for r in rows] == [[3, 5], [1, 2]]
    assert {r["kind"] for r in rows} == {"float32"}
    assert rows[0]["item"] == "suite::check[fp16]" and rows[0]["seconds"] > 0

    floor = bench_module("forward_floor")
    summary = floor.summarize(rows + [{"item": "x", "kind": "nf4", "shape": [1, 1], "seconds": 0.5}])
    assert summary["float32"]["forwards"] == 2 and summary["float32"]["tokens"] == 17
    assert summary["nf4"] == {"forwards": 1, "tokens": 1, "seconds": 0.5}


def test_the_fit_recovers_a_per_forward_and_a_per_token_cost():
    import time

    class Timed:  # a "model" whose forward costs 20 ms + 1 ms per token
        def __call__(self, input_ids, attention_mask):
            time.sleep(0.020 + 0.001 * input_ids.shape[1])

    per_forward, per_token = bench_module("forward_floor").fit(Timed(), lengths=(1, 8, 32), repeats=1)
    assert per_forward == pytest.approx(0.020, abs=0.006)
    assert per_token == pytest.approx(0.001, abs=0.0003)


def test_the_fit_never_gives_a_negative_cost(tiny):
    per_forward, per_token = bench_module("forward_floor").fit(tiny, lengths=(1, 8, 32), repeats=1)
    assert per_forward >= 0 and per_token >= 0
    assert per_forward + 32 * per_token < 1.0  # a 2-layer model of width 16
