"""``padding``: passes on a model that honours the attention mask, fails on one that ignores it.

Unit tests run the check on a tiny random Llama with the real tokenizer (the
behaviour does not depend on training); two pytester runs use the real model.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from harness.checks.base import CheckContext
from harness.checks.padding import PaddingCheck, PaddingSpec
from harness.judge.tolerance import NoiseModel
from harness.errors import CheckFailure
from harness.models.pool import Loaded
from harness.models.variants import VariantSpec

FP16 = VariantSpec("fp16", False)

SUITE = """
suite: pad
checks:
  - id: batch
    kind: padding
    prompts: ["Hi", "The capital of France is"]
    max_new_tokens: 3
"""

# Installed as the pytester project's conftest.py: every Llama forward ignores the attention mask.
IGNORE_MASK = """
import functools

import torch
from transformers.models.llama import modeling_llama

_forward = modeling_llama.LlamaModel.forward


@functools.wraps(_forward)
def _ignore_mask(self, *args, attention_mask=None, **kwargs):
    if attention_mask is not None:
        attention_mask = torch.ones_like(attention_mask)
    return _forward(self, *args, attention_mask=attention_mask, **kwargs)


modeling_llama.LlamaModel.forward = _ignore_mask
"""


@dataclass
class FakePool:
    tokenizer: Any
    model: Any
    resolved: Any = field(default_factory=lambda: types.SimpleNamespace(
        name="tiny", half=types.SimpleNamespace(dtype="float16")))

    def get(self, variant: VariantSpec) -> Loaded:
        return Loaded(variant, self.model, 0.0, 0)


def make_ctx(tokenizer: Any, model: Any) -> CheckContext:
    request = types.SimpleNamespace(node=types.SimpleNamespace(user_properties=[]))
    return CheckContext(
        suite="pad", suite_path=Path("pad.yaml"), check_id="batch", variant=FP16,
        pool=FakePool(tokenizer, model), goldens=None, device=None, request=request,  # type: ignore[arg-type]
    )


def check(**fields: Any) -> PaddingCheck:
    return PaddingCheck(PaddingSpec.model_validate({"id": "batch", "kind": "padding", **fields}))


@pytest.fixture(scope="module")
def tokenizer(embedded_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(embedded_model_dir))


@pytest.fixture
def tiny_model(tokenizer: Any) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        initializer_range=0.5, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


def ignore_mask(model: Any) -> None:
    """Make ``model`` attend to pad tokens: its decoder gets an all-ones attention mask."""
    import torch

    inner = model.model
    forward = inner.forward

    def forward_ignoring_mask(*args: Any, attention_mask: Any = None, **kwargs: Any) -> Any:
        if attention_mask is not None:
            attention_mask = torch.ones_like(attention_mask)
        return forward(*args, attention_mask=attention_mask, **kwargs)

    inner.forward = forward_ignoring_mask


# -- spec -------------------------------------------------------------------------

def test_spec_defaults_and_validation():
    spec = PaddingSpec.model_validate({"id": "p", "kind": "padding"})
    assert len(spec.prompts) >= 2 and spec.max_new_tokens == 8 and spec.tolerance is None
    assert spec.sides == ["left", "right"]
    for bad in ({"prompts": ["only one"]}, {"prompts": ["a", "a"]}, {"prompts": ["a", ""]},
                {"sides": ["left", "left"]}, {"sides": ["top"]}, {"max_new_tokens": 0},
                {"tolerance": {"max_abs_dlogp": 0}}, {"tolerance": {"logits": 1}}):
        with pytest.raises(ValueError):
            PaddingSpec.model_validate({"id": "p", "kind": "padding", **bad})


def test_raw_logit_atol_is_refused_with_the_replacement_named():
    with pytest.raises(ValueError, match=r"atol bounded raw logits.*Use `tolerance: \{max_abs_dlogp"):
        PaddingSpec.model_validate({"id": "p", "kind": "padding", "atol": 0.25})


def test_tolerance_by_quantization_and_per_check():
    spec = PaddingSpec.model_validate({"id": "p", "kind": "padding"})
    noise = NoiseModel()
    assert spec.tolerance_for("fp16-lora") == noise.tolerance("fp16")
    assert spec.tolerance_for("nf4-lora") == noise.tolerance("nf4")
    assert spec.tolerance_for("fp16").max_abs_dlogp < spec.tolerance_for("nf4").max_abs_dlogp
    custom = PaddingSpec.model_validate({"id": "p", "kind": "padding", "tolerance": {"max_abs_dlogp": 0.7}})
    assert custom.tolerance_for("fp16").max_abs_dlogp == 0.7


# -- a tiny random model with the real tokenizer --------------------------------

def test_passes_when_the_mask_is_honoured_and_restores_padding_side(tokenizer, tiny_model):
    tokenizer.padding_side = "right"
    ctx = make_ctx(tokenizer, tiny_model)
    check(max_new_tokens=4, tolerance={"mean_abs_dlogp": 1e-4, "max_abs_dlogp": 1e-4, "tie_gap": 1e-4}).run(ctx)
    assert tokenizer.padding_side == "right"
    assert ctx.figures["padding_max_abs_dlogp_left"] < 1e-4
    assert ctx.figures["padding_max_abs_dlogp_right"] < 1e-4


def test_each_forward_is_made_once(tokenizer, tiny_model):
    """The right side's per-position distributions come from its decoding's prefill (bit for bit the
    uncached pass), and a prompt alone scores a path once for both sides: 3 prompts, 2 sides, 4 new
    tokens is 2 passes (left: distributions, prefill) + 3 decode steps, 1 + 3 on the right, 3 alone."""
    import torch

    from harness.checks.padding import decode_after_prefill, pad_batch, padded_logprobs

    ids = [list(tokenizer(p)["input_ids"]) for p in ("Hi", "The capital of France is", "One two three four five")]
    batch, mask = pad_batch(tokenizer, ids, "right")
    _, prefill = decode_after_prefill(tiny_model, batch, mask, 2)
    assert torch.equal(prefill, padded_logprobs(tiny_model, batch, mask))

    calls = []
    forward = tiny_model.forward
    tiny_model.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    check(max_new_tokens=4, prompts=["Hi", "The capital of France is", "One two three four five"],
          tolerance={"mean_abs_dlogp": 1e-4, "max_abs_dlogp": 1e-4, "tie_gap": 1e-4}).run(make_ctx(tokenizer, tiny_model))
    assert len(calls) == (2 + 3) + (1 + 3) + 3


def test_fails_when_the_mask_is_ignored(tokenizer, tiny_model):
    ignore_mask(tiny_model)
    tokenizer.padding_side = "right"
    ctx = make_ctx(tokenizer, tiny_model)
    with pytest.raises(CheckFailure) as info:
        check(max_new_tokens=4).run(ctx)
    message = str(info.value)
    assert "a padded batch does not behave like its prompts run one at a time" in message
    assert "prompt 0 'Hello!', left padding, position 0 of 2: |Δ log p| " in message
    # right padding cannot leak into the prompt under a causal mask: pads come after every real token,
    # but the continuation generated after the pads attends to them
    assert "right padding, position" not in message
    assert "right padding, continuation: greedy output diverges at new token" in message
    assert tokenizer.padding_side == "right"
    assert ctx.figures["padding_max_abs_dlogp_left"] > 1e-2


def test_generation_divergence_names_prompt_and_first_token(tokenizer, tiny_model):
    ignore_mask(tiny_model)
    ctx = make_ctx(tokenizer, tiny_model)
    with pytest.raises(CheckFailure) as info:
        check(max_new_tokens=6, sides=["left"]).run(ctx)
    message = str(info.value)
    assert "prompt 1 'The capital of France is', left padding, continuation: greedy output diverges at new token" \
        in message
    assert "in the padded batch), got '" in message and "not a near-tie, a real change" in message


def test_prompts_of_equal_length_are_refused(tokenizer, tiny_model):
    ctx = make_ctx(tokenizer, tiny_model)
    with pytest.raises(CheckFailure, match="every prompt encodes to 1 tokens, so nothing gets padded"):
        check(prompts=["Hi", "Yes"]).run(ctx)


# -- the real model ----------------------------------------------------------------

def test_real_model_passes_and_writes_no_golden(project):
    project.suite("pad", SUITE)
    result = project.run("--variants", "fp16", "-v")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*suites/pad.yaml::batch?fp16? PASSED*"])
    assert project.goldens() == []


def test_real_model_that_ignores_the_mask_fails(project):
    project.suite("pad", SUITE)
    project.pytester.makeconftest(IGNORE_MASK)
    result = project.run("--variants", "fp16")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "batch: a padded batch does not behave like its prompts run one at a time*for fp16*",
        "*prompt 0 'Hi', left padding, position 0 of 1: *not a near-tie*",
        "*A model that ignores the attention mask*",
    ])
    out = result.stdout.str()
    assert "right padding, position" not in out  # a causal mask keeps pads after the prompt invisible to it
    assert "right padding, continuation: greedy output diverges at new token" in out


def nan_when_padded(model: Any) -> None:
    """What eager fp16 attention does to some models: padded rows come out as NaN."""
    forward = model.forward

    def forward_with_nan(*args: Any, attention_mask: Any = None, **kwargs: Any) -> Any:
        out = forward(*args, attention_mask=attention_mask, **kwargs)
        if attention_mask is not None and not bool(attention_mask.all()):
            rows = ~attention_mask.bool().all(dim=-1)
            out.logits[rows] = float("nan")
        return out

    model.forward = forward_with_nan


def test_nan_rows_are_named_as_nan_never_passed(tokenizer, tiny_model):
    nan_when_padded(tiny_model)
    ctx = make_ctx(tokenizer, tiny_model)
    with pytest.raises(CheckFailure) as info:
        check(max_new_tokens=3, sides=["left"], tolerance={"max_abs_dlogp": 5, "mean_abs_dlogp": 5,
                                                           "tie_gap": 5}).run(ctx)
    message = str(info.value)
    assert "prompt 0 'Hello!', left padding, position 0 of 2: this run has NaN log-probabilities" in message
    assert "NaN never passes" in message


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_a_correct_model_it_was_not_written_for_passes_with_default_tolerances(tokenizer, attention):
    """A Qwen2-architecture model (random weights, float16 as the fp16 variant loads it), either kernel."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, attn_implementation=attention,
    )
    model = Qwen2ForCausalLM(config).to(torch.float16).eval()
    ctx = make_ctx(tokenizer, model)
    check(max_new_tokens=4).run(ctx)
