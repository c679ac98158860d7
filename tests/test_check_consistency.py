"""``cache``, ``kernels`` and ``batch`` on the real model: pass as it is, fail on a constructed fault.

One pytester run installs three faults at once (a KV cache whose keys are ignored,
an attention kernel whose output is perturbed, a forward that leaks across batch
rows); each must fail its own check, with the engine's evidence.
"""

from __future__ import annotations

import pytest

from harness.checks.batch import BatchSpec, others
from harness.checks.cache import CacheSpec
from harness.checks.kernels import KernelsSpec

SUITE = """
suite: cons
checks:
  - id: kv
    kind: cache
    prompts: ["The capital of France is"]
    max_new_tokens: 6
  - id: kv-static
    kind: cache
    caches: [static]
    prompts: ["The capital of France is"]
    max_new_tokens: 3
  - id: attn
    kind: kernels
    implementations: [sdpa, IMPL]
    prompts: ["The capital of France is"]
    max_new_tokens: 6
  - id: rows
    kind: batch
    prompts: ["Water boils at a temperature of"]
    max_new_tokens: 4
  - id: rows-two
    kind: batch
    batch_sizes: [2]
    shapes: [mixed]
    positions: [first]
    prompts: ["Water boils at a temperature of"]
    max_new_tokens: 2
"""

# Installed as the project's conftest.py: four faults, each visible to one kind only.
FAULTS = """
from transformers import AttentionInterface, cache_utils
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.llama import modeling_llama

# 1. a cache that stores keys and values but attends only to the current token's
_update = cache_utils.DynamicLayer.update


def _ignore_cache(self, key_states, value_states, *args, **kwargs):
    _update(self, key_states, value_states, *args, **kwargs)
    return key_states, value_states


cache_utils.DynamicLayer.update = _ignore_cache


# 2. a static cache that cannot be built
def _no_static(self, *args, **kwargs):
    raise RuntimeError("static cache fault")


cache_utils.StaticCache.__init__ = _no_static


# 3. an attention kernel whose output is 5% too large
def _perturbed(module, query, key, value, attention_mask, **kwargs):
    out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return out * 1.05, weights


AttentionInterface.register("perturbed", _perturbed)

# 4. padded rows of a batch take 5% of the neighbouring row's embeddings; unpadded rows are left alone
_forward = modeling_llama.LlamaModel.forward


def _leak(self, input_ids=None, inputs_embeds=None, attention_mask=None, **kwargs):
    if inputs_embeds is None:
        inputs_embeds = self.embed_tokens(input_ids)
    if inputs_embeds.shape[0] > 1 and attention_mask is not None and attention_mask.dim() == 2:
        padded = (attention_mask == 0).any(-1).to(inputs_embeds.dtype)[:, None, None]
        inputs_embeds = inputs_embeds + 0.05 * padded * inputs_embeds.roll(1, dims=0)
    return _forward(self, input_ids=None, inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)


modeling_llama.LlamaModel.forward = _leak
"""


def test_real_model_is_self_consistent(project):
    project.suite("cons", SUITE.replace("IMPL", "eager"))
    result = project.run("--variants", "fp16", "-v")
    result.assert_outcomes(passed=5)
    assert project.goldens() == []


def test_each_fault_fails_its_own_check(project):
    project.suite("cons", SUITE.replace("IMPL", "perturbed"))
    project.pytester.makeconftest(FAULTS)
    result = project.run("--variants", "fp16", "-rs")
    result.assert_outcomes(failed=4, skipped=1)
    out = result.stdout.str()
    result.stdout.fnmatch_lines([
        "kv: decoding with the KV cache differs from recomputing without it (tolerance for fp16*",
        "*prompt 'The capital of France is', dynamic cache vs no cache:",
        "*greedy output diverges at new token *: expected * (log p * in the no-cache run), got * (log p *)*"
        "not a near-tie, a real change*",
        "*float32 forward of the same tokens (one pass, no cache): agrees with the no-cache run (mean |Δ log p| *"
        "against * for the dynamic run)*: the dynamic cache is the broken path",
    ])
    result.stdout.fnmatch_lines(["*Also not judged: prompt 'The capital of France is', static cache: "
                                 "RuntimeError: static cache fault*"])
    assert "static cache vs no cache" not in out  # the static cache raised: never compared, never passed
    result.stdout.fnmatch_lines([  # the static cache alone: NOT JUDGED with the real error, not a pass
        "SKIPPED * NOT JUDGED: kv-static[[]fp16[]]: decoding raised, so that cache was not judged: prompt "
        "'The capital of France is', static cache: RuntimeError: static cache fault*",
    ])
    result.stdout.fnmatch_lines([
        "attn: attention implementations disagree beyond numerical noise*",
        "*prompt 'The capital of France is', perturbed vs sdpa:*",
        "*Pin the right one with the registry's attn_implementation*",
    ])
    result.stdout.fnmatch_lines([
        "rows: a prompt scored inside a batch differs from the same prompt alone*",
        "*batch of 4 (mixed lengths), first row:*",
        "*|Δ log p| * on the reference's top-5 > per-row tolerance*",
    ])
    assert "batch of 4 (equal lengths)" not in out  # no padding, no leak
    result.stdout.fnmatch_lines([  # two rows: the prompt's own row is the padded one
        "rows-two: a prompt scored inside a batch differs from the same prompt alone*",
        "*batch of 2 (mixed lengths), first row:*",
    ])


# -- specs and helpers, no model ----------------------------------------------------

@pytest.mark.parametrize("spec, fields", [
    (CacheSpec, {"kind": "cache", "caches": ["dynamic", "dynamic"]}),
    (CacheSpec, {"kind": "cache", "caches": ["offloaded"]}),
    (CacheSpec, {"kind": "cache", "prompts": [], "chats": []}),
    (CacheSpec, {"kind": "cache", "tolerance": {"mean_abs_dlogp": -1}}),
    (CacheSpec, {"kind": "cache", "tolerance": {"nf5": {"tie_gap": 0.1}}}),
    (CacheSpec, {"kind": "cache", "tolerance": {"nf4": {"tie": 0.1}}}),
    (KernelsSpec, {"kind": "kernels", "implementations": ["sdpa"]}),
    (KernelsSpec, {"kind": "kernels", "implementations": ["sdpa", "eager"], "require": ["flex_attention"]}),
    (BatchSpec, {"kind": "batch", "batch_sizes": [1]}),
    (BatchSpec, {"kind": "batch", "positions": ["middle"]}),
    (BatchSpec, {"kind": "batch", "shapes": ["equal", "equal"]}),
    (BatchSpec, {"kind": "batch", "atol": 0.1}),
])
def test_specs_refuse_bad_fields(spec, fields):
    with pytest.raises(ValueError):
        spec.model_validate({"id": "x", **fields})


def test_tolerance_override_reaches_the_engine():
    import types

    from harness.checks.consistency import tolerance_for
    from harness.models.variants import VariantSpec

    spec = CacheSpec.model_validate({"id": "x", "kind": "cache",
                                     "tolerance": {"tie_gap": 0.2, "nf4": {"tie_gap": 0.6, "mean_abs_dlogp": 0.5}}})
    ctx = types.SimpleNamespace(variant=VariantSpec("nf4", True), half="float16")
    tol = tolerance_for(ctx, spec)  # type: ignore[arg-type]
    assert (tol.tie_gap, tol.mean_abs_dlogp) == (0.6, 0.5) and "set in the check" in tol.source
    ctx.variant = VariantSpec("fp16", False)
    assert tolerance_for(ctx, spec).tie_gap == 0.2  # type: ignore[arg-type]


def test_batch_rows_are_distinct_and_shaped():
    filler = list(range(100, 130))
    equal = others(filler, 9, 3, "equal")
    assert [len(r) for r in equal] == [9, 9, 9] and len({tuple(r) for r in equal}) == 3
    mixed = others(filler, 9, 3, "mixed")
    assert len({len(r) for r in mixed}) == 3 and min(len(r) for r in mixed) < 9 < max(len(r) for r in mixed)


@pytest.mark.parametrize("length", [1, 2, 9, 40])
@pytest.mark.parametrize("count", [1, 2, 3, 7])
def test_a_mixed_batch_pads_the_prompt_row_at_every_size(length, count):
    """Two rows included: the other row is longer, so the prompt's own row is the padded one."""
    rows = others(list(range(100, 130)), length, count, "mixed")
    assert max(len(r) for r in rows) > length
    assert len({len(r) for r in rows}) == count or length < 4  # distinct where lengths allow


def _tiny_llama(seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         initializer_range=0.5, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return LlamaForCausalLM(config).eval()


def test_judge_run_decodes_only_where_the_one_pass_verdict_fails(monkeypatch):
    """A model that agrees is judged from one forward pass over the reference's path (no decode);
    another model fails, and its verdict comes from a real decode (random weights: no trained
    behaviour is under test, only which runs the judgement makes)."""
    import harness.checks.consistency as consistency
    from harness.checks.consistency import Prompt, greedy, judge_run
    from harness.judge.compare import sides
    from harness.judge.tolerance import Tolerance

    import types

    model, other = _tiny_llama(0), _tiny_llama(1)
    tokenizer = types.SimpleNamespace(pad_token_id=2, eos_token_id=2)
    prompt = Prompt("tiny", [5, 9, 11, 3])
    reference = greedy(model, tokenizer, prompt, 6)
    decodes: list[int] = []

    def counting(*args, **kwargs):
        decodes.append(1)
        return greedy(*args, **kwargs)

    monkeypatch.setattr(consistency, "greedy", counting)
    tol = Tolerance(mean_abs_dlogp=0.01, max_abs_dlogp=0.05, tie_gap=0.05, max_margin_shift=0.1)
    named = sides("first", "second")
    assert judge_run(reference, model, tokenizer, prompt, 6, tol, sides=named).ok and decodes == []
    verdict = judge_run(reference, other, tokenizer, prompt, 6, tol, sides=named)
    assert not verdict.ok and decodes == [1]
    unconfirmed = judge_run(reference, other, tokenizer, prompt, 6, tol, sides=named, confirm=False)
    assert not unconfirmed.ok and decodes == [1]  # a figure's verdict: the one pass stands, nothing decoded
