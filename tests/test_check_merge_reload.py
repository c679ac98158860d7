"""``lora_merge`` and ``save_reload`` on the real model and adapter: pass as they are, fail on faults.

The faults: a merge that drops the LoRA deltas of one decoder layer (the first
four merged modules: layer 0's q, k, v and o projections), and a save that loses
one tensor (a base weight from ``save_pretrained`` of the model, a ``lora_A`` from
the adapter's).
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

NF4_BUDGET = """
  - id: nf4-merge
    kind: lora_merge
    variants: [nf4-lora]
    chats: [[{role: user, content: "Create a funny joke about chickens."}]]
    max_new_tokens: 6
    nf4_budget: {max_mean_abs_dlogp: 0.001}
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
"""


@pytest.mark.parametrize("kernel", ["sdpa", "eager"])  # eager: the reload must not fall back to sdpa
def test_merge_and_reload_agree_on_the_real_model(project, kernel):
    project.suite("mr", SUITE)
    result = project.run("--variants", "fp16,fp16-lora", "-v", "--attn-implementation", kernel)
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["*mr.yaml::reload?fp16? PASSED*", "*mr.yaml::merge?fp16-lora? PASSED*",
                                 "*mr.yaml::reload?fp16-lora? PASSED*"])


def test_dropped_delta_lost_tensor_and_nf4_budget_fail(project):
    project.suite("mr", SUITE + NF4_BUDGET)
    project.pytester.makeconftest(FAULTS)
    result = project.run("--variants", "fp16,fp16-lora,nf4-lora")
    result.assert_outcomes(failed=4)
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
    result.stdout.fnmatch_lines([
        "nf4-merge: mean |Δ log p| * > budget 0.001 (merging into the NF4 base moves the unmerged greedy "
        "tokens' log-probs by mean *, max * over 6 steps*",
    ])


# -- specs, no model ------------------------------------------------------------------

def test_lora_merge_defaults_to_adapter_variants():
    assert LoraMergeSpec.model_validate({"id": "m", "kind": "lora_merge"}).variants == ["fp16-lora", "nf4-lora"]
    spec = LoraMergeSpec.model_validate({"id": "m", "kind": "lora_merge", "variants": ["nf4-lora"]})
    assert spec.variants == ["nf4-lora"] and spec.nf4_budget.max_mean_abs_dlogp is None
    with pytest.raises(ValueError):
        LoraMergeSpec.model_validate({"id": "m", "kind": "lora_merge", "nf4_budget": {"max_kl": 1}})


def test_save_reload_match_is_exact_or_noise():
    assert SaveReloadSpec.model_validate({"id": "s", "kind": "save_reload"}).match == "exact"
    with pytest.raises(ValueError):
        SaveReloadSpec.model_validate({"id": "s", "kind": "save_reload", "match": "close"})
