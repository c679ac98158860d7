"""``lora_merge`` and ``save_reload`` on the real model and adapter: pass as they are, fail on faults.

The faults: a merge that drops the LoRA deltas of one decoder layer (the first
four merged modules: layer 0's q, k, v and o projections), a save that loses
one tensor (a base weight from ``save_pretrained`` of the model, a ``lora_A`` from
the adapter's), an NF4 merge whose delta is infinite, and an NF4 save that raises.
"""

from __future__ import annotations

import pytest

from harness.checks.lora_merge import LoraMergeSpec
from harness.checks.save_reload import SaveReloadSpec

SUITE = """
suite: mr
checks:
  - id: merge
    kind: lora_merge
    variants: [fp16-lora]
    chats: [[{role: user, content: "Create a funny joke about chickens."}]]
    max_new_tokens: 6
  - id: reload
    kind: save_reload
    variants: [fp16, fp16-lora]
    prompts: ["The capital of France is"]
    max_new_tokens: 4
"""

NF4 = """
  - id: nf4-merge
    kind: lora_merge
    variants: [nf4-lora]
    chats: [[{role: user, content: "Create a funny joke about chickens."}]]
    max_new_tokens: 4
  - id: nf4-save
    kind: save_reload
    variants: [nf4]
    match: noise
    prompts: ["The capital of France is"]
    max_new_tokens: 2
"""

FAULTS = """
import peft.peft_model
import transformers.modeling_utils
from peft.tuners.lora import layer as lora_layer

# a merge that drops one decoder layer's deltas: the first four merged modules are layer 0's q, k, v, o
_merge = lora_layer.Linear.merge
_calls = []


def _drop_first_layer(self, *args, **kwargs):
    _calls.append(1)
    if len(_calls) <= 4:
        return None
    return _merge(self, *args, **kwargs)


lora_layer.Linear.merge = _drop_first_layer


# a save that loses a tensor, in the model's and in the adapter's save_pretrained
def _losing(save, drop):
    def save_file(tensors, filename, *args, **kwargs):
        lost = next((k for k in tensors if drop in k), None)
        return save({k: v for k, v in tensors.items() if k != lost}, filename, *args, **kwargs)
    return save_file


transformers.modeling_utils.safe_save_file = _losing(transformers.modeling_utils.safe_save_file,
                                                     "layers.3.mlp.down_proj")
peft.peft_model.safe_save_file = _losing(peft.peft_model.safe_save_file, "lora_A")


# an NF4 merge that returns inf: every LoRA delta on a 4-bit base is infinite (NaN where it was 0)
from peft.tuners.lora import bnb as lora_bnb

_delta = lora_bnb.Linear4bit.get_delta_weight
lora_bnb.Linear4bit.get_delta_weight = lambda self, adapter: _delta(self, adapter) * float("inf")


# an NF4 save that raises (a bitsandbytes that cannot serialize 4-bit weights); other saves as they were
_save_pretrained = transformers.modeling_utils.PreTrainedModel.save_pretrained


def _cannot_save_4bit(self, *args, **kwargs):
    if getattr(self, "is_loaded_in_4bit", False):
        raise NotImplementedError("4-bit serialization fault")
    return _save_pretrained(self, *args, **kwargs)


transformers.modeling_utils.PreTrainedModel.save_pretrained = _cannot_save_4bit
"""

# The three merges into NF4 on the real adapter, with a budget the re-quantizing ones cannot meet.
NF4_PATHS = """
suite: paths
checks:
  - id: nf4-paths
    kind: lora_merge
    variants: [nf4-lora]
    chats: [[{role: user, content: "Create a funny joke about chickens."}]]
    max_new_tokens: 4
    nf4_budget: {max_adapter_lost: 0.5}
"""


@pytest.mark.parametrize("kernel", ["sdpa", "eager"])  # eager: the reload must not fall back to sdpa
def test_merge_and_reload_agree_on_the_real_model(project, kernel):
    project.suite("mr", SUITE)
    result = project.run("--variants", "fp16,fp16-lora", "-v", "--attn-implementation", kernel)
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["*mr.yaml::reload?fp16? PASSED*", "*mr.yaml::merge?fp16-lora? PASSED*",
                                 "*mr.yaml::reload?fp16-lora? PASSED*"])


def test_dropped_delta_lost_tensor_inf_merge_and_nf4_save_error_fail(project):
    project.suite("mr", SUITE + NF4)
    project.pytester.makeconftest(FAULTS)
    result = project.run("--variants", "fp16,fp16-lora,nf4,nf4-lora", "-rs")
    result.assert_outcomes(failed=4, skipped=1)
    result.stdout.fnmatch_lines([
        "merge: the merged adapter (merge_and_unload) does not behave like the unmerged one (tolerance for fp16*",
        "*merged vs unmerged adapter:*",
        "*a LoRA delta was lost or applied twice*",
    ])
    result.stdout.fnmatch_lines([
        "*reloading the model saved by save_pretrained * reports missing keys: "
        "model.layers.3.mlp.down_proj.weight*",
    ])
    result.stdout.fnmatch_lines([  # the pool's adapter loader names the tensor missing from the file
        "the adapter saved by save_pretrained does not load back: Adapter * did not load into 'smollm2-135m': "
        "1 of the * tensors its LoRA layers need are missing from the file (first: *lora_A*",
    ])
    result.stdout.fnmatch_lines([  # no budget set: inf fails all the same
        "nf4-merge: merging the adapter into the NF4 base: merge_and_unload() into the NF4 base (peft "
        "re-quantizes) gives NaN or infinite log-probabilities*",
    ])
    result.stdout.fnmatch_lines([
        "SKIPPED * NOT JUDGED: nf4-save[[]nf4[]]: saving the NF4 model raised, so its reload was not judged: "
        "NotImplementedError: 4-bit serialization fault*",
    ])


def test_nf4_merge_paths_say_which_stays_within_noise_and_the_budget_can_fail(project):
    project.suite("paths", NF4_PATHS)
    result = project.run("--variants", "nf4-lora")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "nf4-paths: merging the adapter into the NF4 base: merge_and_unload() into the NF4 base (peft "
        "re-quantizes): loses 0.* of the adapter's effect > budget max_adapter_lost 0.5; dequantize to 16-bit, "
        "merge, re-quantize to NF4: loses 0.* of the adapter's effect > budget max_adapter_lost 0.5",
        "the adapter's own effect (adapter on vs off) is mean |Δ log p| *",
        "  - merge_and_unload() into the NF4 base (peft re-quantizes): mean |Δ log p| *, max * over 4 steps, "
        "0.* of the adapter's effect lost; not within the variant's noise; *",
        "  - dequantize to 16-bit, merge, re-quantize to NF4: * not within the variant's noise*",
        "  - dequantize to 16-bit, merge, keep 16-bit: mean |Δ log p| 0.0*, 0.0* of the adapter's effect lost; "
        "within the variant's noise*",
        "Re-quantizing rounds each merged weight back to one of the 16 NF4 levels of its block*",
    ])


# -- specs, no model ------------------------------------------------------------------

def test_lora_merge_defaults_to_adapter_variants():
    assert LoraMergeSpec.model_validate({"id": "m", "kind": "lora_merge"}).variants == ["fp16-lora", "nf4-lora"]
    spec = LoraMergeSpec.model_validate({"id": "m", "kind": "lora_merge", "variants": ["nf4-lora"]})
    assert spec.variants == ["nf4-lora"] and spec.nf4_budget.max_mean_abs_dlogp is None
    with pytest.raises(ValueError):
        LoraMergeSpec.model_validate({"id": "m", "kind": "lora_merge", "nf4_budget": {"max_kl": 1}})
    with pytest.raises(ValueError):
        LoraMergeSpec.model_validate({"id": "m", "kind": "lora_merge", "nf4_budget": {"max_adapter_lost": -1}})


def _path(path, mean, within=True):
    from harness.checks.lora_merge import PathResult

    return PathResult(path=path, mean=mean, worst=mean * 3, steps=4, within_noise=within, changes=())


@pytest.mark.parametrize("results, budget, expected", [
    # the default suite's state: the re-quantizing merges lose most of the adapter, the 16-bit one keeps it
    ([_path("merge_and_unload", 3.2, False), _path("requantize", 3.2, False), _path("dequantize", 0.01)],
     {"max_adapter_lost": 1.0}, []),
    ([_path("merge_and_unload", 3.2, False), _path("requantize", 3.2, False), _path("dequantize", 0.01)],
     {"max_adapter_lost": 0.5}, ["merge_and_unload() into the NF4 base (peft re-quantizes): loses 0.86",
                                 "dequantize to 16-bit, merge, re-quantize to NF4: loses 0.86"]),
    ([_path("merge_and_unload", float("inf"), False), _path("requantize", 1.0, False), _path("dequantize", 0.01)],
     {}, ["merge_and_unload() into the NF4 base (peft re-quantizes) gives NaN or infinite"]),
    ([_path("merge_and_unload", 1.0, False), _path("requantize", 1.0, False), _path("dequantize", 0.5, False)],
     {}, ["dequantize to 16-bit, merge, keep 16-bit is not within the variant's noise"]),
    ([_path("merge_and_unload", 1.0, False), _path("requantize", 1.0, False), _path("dequantize", 0.0)],
     {"max_mean_abs_dlogp": 0.5, "max_abs_dlogp": 2.0}, ["merge_and_unload() * mean |Δ log p| 1 > budget 0.5",
                                                          "merge_and_unload() * max |Δ log p| 3 > budget 2"]),
])
def test_nf4_merge_judgement(results, budget, expected):
    import fnmatch

    from harness.checks.lora_merge import LoraMergeCheck

    check = LoraMergeCheck(LoraMergeSpec.model_validate({"id": "m", "kind": "lora_merge", "nf4_budget": budget}))
    problems = check._problems(results, effect=3.72)
    for pattern in expected:
        assert any(fnmatch.fnmatch(p, pattern + "*") for p in problems), (pattern, problems)
    assert (not problems) == (not expected)


def test_save_reload_match_is_exact_or_noise():
    assert SaveReloadSpec.model_validate({"id": "s", "kind": "save_reload"}).match == "exact"
    with pytest.raises(ValueError):
        SaveReloadSpec.model_validate({"id": "s", "kind": "save_reload", "match": "close"})


def test_on_the_cpu_packed_layout_the_verdict_holds_and_peft_merging_it_is_a_platform_finding(project, monkeypatch):
    """bitsandbytes' CPU-packed layout (what an AVX512-BF16 CPU holds after the first forward), on any CPU: the
    model and adapter get the plain layout's verdict, and peft's merge of the layout as loaded is reported."""
    monkeypatch.setenv("HARNESS_4BIT_LAYOUT", "cpu-packed")
    project.suite("paths", NF4_PATHS.replace("{max_adapter_lost: 0.5}", "{max_adapter_lost: 1}"))
    result = project.run("--variants", "nf4-lora", "-p", "harness.run.cpu_packed", "-W", "default", subprocess=True)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([
        "note: 4-bit weights repacked into the CPU-packed layout (HARNESS_4BIT_LAYOUT)*",
        "nf4-paths[[]nf4-lora[]]: platform finding, not a verdict on the model or adapter: the NF4 weights are in "
        "bitsandbytes' CPU-packed 4-bit layout*peft's merge_and_unload() reads them as the plain layout: "
        "merge_and_unload() into the NF4 base (peft re-quantizes): mean |Δ log p| *, against mean |Δ log p| * "
        "merging the same model from the plain layout*python -m harness.upstream.peft_merge_cpu_packed*",
    ])
