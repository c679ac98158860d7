"""``expect``: assertions on decoded answers, greedy and sampled, on the real model."""

from __future__ import annotations

import pytest

from harness.checks.expect import ExpectSpec
from harness.checks.expect_assertions import Answer, Assertion, judge

SUITE = """
suite: exp
checks:
  - id: paris
    kind: expect
    prompt: "The capital of France is"
    max_new_tokens: 6
    expect:
      - contains: "Paris"
      - not_contains: "London"
      - regex: "^ Paris\\\\b"
  - id: pirate
    kind: expect
    variants: [fp16-lora]
    messages: [{role: user, content: "Create a funny joke about chickens."}]
    max_new_tokens: 6
    expect: [{starts_with: "Arr"}]
  - id: wrong
    kind: expect
    variants: [fp16]
    prompt: "The capital of France is"
    max_new_tokens: 6
    expect:
      - starts_with: "Berlin"
      - json: {schema: {type: object}}
      - stops: true
  - id: sampled
    kind: expect
    variants: [fp16]
    prompt: "The capital of France is"
    max_new_tokens: 4
    sample: {n: 4, seed: 0, temperature: 0.7, min_pass_rate: 0.5}
    expect: [{contains: "zebra"}]
"""


def test_expectations_pass_and_fail_on_the_real_model(project):
    project.suite("exp", SUITE)
    result = project.run("--variants", "fp16,fp16-lora", "-v")
    result.assert_outcomes(passed=3, failed=2)
    result.stdout.fnmatch_lines([
        "*exp.yaml::paris?fp16? PASSED*", "*exp.yaml::paris?fp16-lora? PASSED*", "*exp.yaml::pirate?fp16-lora? PASSED*",
    ])
    result.stdout.fnmatch_lines([
        "wrong: the greedy answer ' Paris*' (6 tokens, cut at max_new_tokens) fails:",
        "  - does not start with 'Berlin'; it starts with 'Paris*",
        "  - is not JSON (Expecting value at line 1, column 1)",
        "  - does not end by itself: no eos within max_new_tokens (6 tokens)",
        "*expectations are not goldens and are never re-recorded*",
    ])
    result.stdout.fnmatch_lines([
        "sampled: 0 of 4 samples (seed 0, temperature 0.7, top_p 1) pass, a rate of 0.00 < min_pass_rate 0.5*",
        "  - '*': does not contain 'zebra'",
    ])
    assert project.goldens() == []


def a(**fields):
    return Assertion.model_validate(fields)


@pytest.mark.parametrize("assertion, text, reason", [
    (a(contains="paris"), " Paris is", "does not contain 'paris'"),
    (a(one_of=["yes", "no"]), " maybe ", "is not one of ['yes', 'no']"),
    (a(regex=r"\d{4}"), "in 89 AD", "has no match for regex '\\\\d{4}'"),
    (a(json={"schema": {"type": "object", "required": ["city"]}}), '{"town": "Paris"}',
     "does not match the JSON schema at (root): 'city' is a required property"),
    (a(json={"schema": {"type": "object", "properties": {"n": {"type": "integer"}}}}), '{"n": "3"}',
     "does not match the JSON schema at n: '3' is not of type 'integer'"),
    (a(max_tokens=3), "one two three four", "has 4 tokens > max_tokens 3"),
])
def test_judge_reasons(assertion, text, reason):
    assert judge(assertion, Answer(text, len(text.split()), True), ignore_case=False) == reason


def test_judge_passes_and_ignore_case():
    assert judge(a(one_of=["Yes", "No"]), Answer(" yes\n", 1, True), ignore_case=True) is None
    assert judge(a(contains="paris"), Answer(" Paris", 1, True), ignore_case=True) is None
    assert judge(a(json=True), Answer(' {"a": [1, 2]} ', 5, True), ignore_case=False) is None
    assert judge(a(stops=True), Answer("x", 1, True), ignore_case=False) is None


@pytest.mark.parametrize("expect", [
    [{}], [{"contains": "a", "regex": "b"}], [{"regex": "(unclosed"}], [{"json": {"schema": {"type": "nope"}}}],
    [{"json": False}], [{"equals": "x"}], [],
])
def test_spec_refuses_bad_expectations(expect):
    with pytest.raises(ValueError):
        ExpectSpec.model_validate({"id": "e", "kind": "expect", "prompt": "x", "expect": expect})


def test_spec_needs_one_prompt_and_a_valid_sample():
    with pytest.raises(ValueError):
        ExpectSpec.model_validate({"id": "e", "kind": "expect", "expect": [{"contains": "x"}]})
    with pytest.raises(ValueError):
        ExpectSpec.model_validate({"id": "e", "kind": "expect", "prompt": "x", "expect": [{"contains": "x"}],
                                   "sample": {"n": 0}})


@pytest.mark.parametrize("old, new, p", [
    ([True] * 8, [True] * 8, 1.0),  # an unchanged NEW draws the same samples: nothing discordant
    ([True] * 9 + [False], [True] * 5 + [False] * 5, 0.0625),  # 0.9 -> 0.5 on 10 samples: not enough evidence
    ([True] * 29 + [False] * 3, [True] * 16 + [False] * 16, 2 ** -13),  # the same drop on 32: significant
    ([False, True, True, True], [True, False, False, False], 5 / 16),  # 3 worse, 1 better: P(X >= 3), X ~ Bin(4, 1/2)
])
def test_paired_drop_is_exact_mcnemar_one_sided(old, new, p):
    from harness.checks.expect_sampling import paired_drop

    test = paired_drop(old, new)
    assert test.p_value == pytest.approx(p) and test.n == len(old)
    assert test.old_only == sum(o and not n for o, n in zip(old, new))
    assert test.new_rate == sum(new) / len(new)


class _Tokenizer:
    eos_token_id = 5  # the tokenizer's eos, which the model's generation_config does not stop at
    pad_token_id = 0

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(map(str, ids))


class _Model:
    """Generates a fixed row: the tokenizer's eos (5) early, the generation_config's eos (9) nowhere."""

    def __init__(self, row, eos):
        import torch
        from transformers import GenerationConfig

        self.row, self.generation_config = row, GenerationConfig(eos_token_id=eos)
        self._param = torch.nn.Parameter(torch.zeros(1))

    def parameters(self):
        return iter([self._param])

    def generate(self, input_ids, **kwargs):
        import torch

        return torch.tensor([input_ids[0].tolist() + self.row])


@pytest.mark.parametrize("eos, stopped, tokens", [(9, False, 4), (5, True, 1)])
def test_answers_stop_where_generate_stops(eos, stopped, tokens):
    """Only the model's generation_config eos ends an answer, as in generate(); the tokenizer's does not."""
    from harness.checks.expect import generate_answers

    spec = ExpectSpec.model_validate({"id": "e", "kind": "expect", "prompt": "x", "expect": [{"stops": True}],
                                      "max_new_tokens": 4})
    answer = generate_answers(_Model([7, 5, 8, 6], eos), _Tokenizer(), [1, 2], spec)[0]
    assert (answer.stopped, answer.new_tokens) == (stopped, tokens)


def test_samples_share_the_prompt_and_draw_what_generate_draws():
    """n samples from one prefill whose cache is repeated are generate(num_return_sequences=n)'s samples:
    the same seeded stream over the same distributions (a random tiny model, where any mismatch of
    cache, positions or stream would change the draws)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from harness.checks.expect_sampling import Sampling, sample_rows

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                                         bos_token_id=None, eos_token_id=None)).eval()
    tokenizer = type("T", (), {"pad_token_id": 0})()
    prompt = torch.tensor([[5, 9, 17, 3, 40, 22]])
    s = Sampling(n=6, seed=3, temperature=1.0)
    calls = []
    forward = model.forward
    model.forward = lambda *a, **k: calls.append(k.get("input_ids", a[0] if a else None).shape) or forward(*a, **k)
    shared = sample_rows(model, tokenizer, prompt, s, 5)
    assert calls[0] == (1, 5) and all(shape[1] == 1 for shape in calls[1:])  # the prompt once, then one token a step
    model.forward = forward
    torch.manual_seed(s.seed)
    with torch.inference_mode():
        plain = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5,
                               do_sample=True, temperature=1.0, top_p=1.0, top_k=0, num_return_sequences=6,
                               pad_token_id=0)
    assert torch.equal(shared, plain)
    assert len({tuple(row) for row in shared[:, 6:].tolist()}) > 1  # the samples differ: a real stream was drawn
