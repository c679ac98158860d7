"""``expect``: assertions on decoded answers, greedy and sampled, on the real model."""

from __future__ import annotations

import pytest

from harness.checks.expect import Answer, Assertion, ExpectSpec, judge

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
