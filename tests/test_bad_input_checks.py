"""Bad input, checks: every kind validates its prompts, chats and parameters at collection; an assertion that
cannot fail (or cannot pass) is a suite error; numbers follow one rule; a check that cannot judge is never green.

Examples found by trying the harness from outside are marked "example"; the other cases are invented ones of the same classes.
"""

from __future__ import annotations

import pytest

from conftest import suite_error
from harness.checks import get_check, known_kinds
from harness.errors import SuiteError
from harness.suites.spec import load_suite

# (suite text, words the one-paragraph error must contain)
REFUSED = {
    # -- empty inputs: every kind validates them at collection -------------------------------------------
    "example: expect with messages: []": (
        "checks:\n  - id: a\n    kind: expect\n    messages: []\n    expect: [{contains: Paris}]\n",
        ["bad.yaml:4: checks[0].messages: an empty conversation has nothing to render"]),
    "example: cache with an empty chat": (
        "checks:\n  - id: a\n    kind: cache\n    chats:\n      - []\n",
        ["bad.yaml:5: checks[0].chats[0]: an empty conversation has nothing to render"]),
    "expect with an empty prompt": (
        "checks:\n  - id: a\n    kind: expect\n    prompt: ''\n    expect: [{contains: Paris}]\n",
        ["bad.yaml:4: checks[0].prompt: an empty prompt gives the model nothing to continue"]),
    "batch with an empty prompt among others": (
        "checks:\n  - id: a\n    kind: batch\n    prompts: [Hello, '']\n",
        ["checks[0].prompts[1]: an empty prompt gives the model nothing to continue"]),
    "kernels with an empty chat": (
        "checks:\n  - id: a\n    kind: kernels\n    chats: [[]]\n",
        ["checks[0].chats[0]: an empty conversation"]),
    "save_reload with an empty prompt": (
        "checks:\n  - id: a\n    kind: save_reload\n    prompts: ['']\n",
        ["checks[0].prompts[0]: an empty prompt"]),
    "memory workload with an empty prompt": (
        "checks:\n  - id: a\n    kind: memory\n    workload: {prompts: ['']}\n",
        ["checks[0].workload.prompts[0]: an empty prompt"]),
    # -- expect: parameters that crash generate() or the validator --------------------------------------
    "example: a JSON schema $ref to a missing definition": (
        "checks:\n  - id: a\n    kind: expect\n    prompt: x\n    expect:\n      - json: {schema: {type: object, "
        "properties: {a: {$ref: '#/$defs/missing'}}}}\n",
        ["checks[0].expect[0].json.schema: the schema's $ref '#/$defs/missing' does not resolve"]),
    "a JSON schema $ref to a remote schema (nothing is fetched)": (
        "checks:\n  - id: a\n    kind: expect\n    prompt: x\n    expect:\n      - json: {schema: {$ref: "
        "'https://example.com/s.json'}}\n",
        ["$ref 'https://example.com/s.json' does not resolve", "nothing is fetched"]),
    "example: a sampling temperature of 1e-45": (
        "checks:\n  - id: a\n    kind: expect\n    prompt: x\n    sample: {temperature: 1e-45}\n"
        "    expect: [{contains: a}]\n",
        ["checks[0].sample.temperature: Input should be greater than or equal to 0.001 (you wrote '1e-45')"]),
    # -- expect: assertions that cannot fail, or cannot pass --------------------------------------------
    "example: contains ''": (
        "checks:\n  - id: a\n    kind: expect\n    prompt: x\n    expect: [{contains: ''}]\n",
        ["checks[0].expect[0]: contains \"\" is true of every answer, so it can never fail"]),
    "example: starts_with ''": (
        "checks:\n  - id: a\n    kind: expect\n    prompt: x\n    expect: [{starts_with: ''}]\n",
        ["starts_with \"\" is true of every answer"]),
    "example: regex ''": (
        "checks:\n  - id: a\n    kind: expect\n    prompt: x\n    expect: [{regex: ''}]\n",
        ["regex '' matches the empty text and every sample answer"]),
    "example: not_contains ''": (
        "checks:\n  - id: a\n    kind: expect\n    prompt: x\n    expect: [{not_contains: ''}]\n",
        ["not_contains \"\" is false of every answer", "always fails"]),
    "a regex that matches anything (.*)": (
        "checks:\n  - id: a\n    kind: expect\n    prompt: x\n    expect: [{regex: '.*'}]\n",
        ["regex '.*' matches the empty text and every sample answer"]),
    "a regex of optional parts only (x?)": (
        "checks:\n  - id: a\n    kind: expect\n    prompt: x\n    expect: [{regex: '(Paris)?'}]\n",
        ["can never fail"]),
    "starts_with only whitespace (answers are stripped first)": (
        "checks:\n  - id: a\n    kind: expect\n    prompt: x\n    expect: [{starts_with: '  '}]\n",
        ["starts_with is only whitespace", "can never pass"]),
    "max_tokens that generation can never exceed": (
        "checks:\n  - id: a\n    kind: expect\n    prompt: x\n    max_new_tokens: 8\n    expect: [{max_tokens: 8}]\n",
        ["checks[0]: expect[0]: max_tokens 8 can never fail, since generation stops at max_new_tokens 8"]),
    # -- one rule for numeric fields across kinds ---------------------------------------------------------
    "example: nf4_budget: .inf": (
        "checks:\n  - id: a\n    kind: lora_merge\n    nf4_budget: {max_abs_dlogp: .inf}\n",
        ["bad.yaml:4: checks[0].nf4_budget.max_abs_dlogp: .inf is not a finite number"]),
    "a memory budget of .inf": (
        "checks:\n  - id: a\n    kind: memory\n    workload: {prompts: [Hi]}\n    budgets:\n      m:\n        cpu:\n"
        "          fp16: {max_weights_mb: .inf}\n",
        ["bad.yaml:8: checks[0].budgets.m.cpu.fp16.max_weights_mb: .inf is not a finite number"]),
    "a drift budget of -.inf": (
        "checks:\n  - id: a\n    kind: drift\n    budgets:\n      m:\n        nf4: {max_kl: -.inf}\n",
        ["checks[0].budgets.m.nf4.max_kl: -.inf is not a finite number"]),
    "a throughput ratio of .inf": (
        "checks:\n  - id: a\n    kind: throughput\n    min_ratios: [{variant: nf4, reference: fp16, ratio: .inf}]\n",
        ["checks[0].min_ratios[0].ratio: .inf is not a finite number"]),
    "a sampling temperature of .inf": (
        "checks:\n  - id: a\n    kind: expect\n    prompt: x\n    sample: {temperature: .inf}\n"
        "    expect: [{contains: a}]\n",
        ["checks[0].sample.temperature: .inf is not a finite number"]),
    "a tolerance of .inf in defaults": (
        "defaults:\n  tolerance: {tie_gap: .inf}\nchecks:\n  - id: a\n    kind: cache\n",
        ["bad.yaml:2: defaults.tolerance.tie_gap: .inf is not a finite number"]),
    "example: save_reload with match: exact and a tolerance": (
        "checks:\n  - id: a\n    kind: save_reload\n    tolerance: {max_abs_dlogp: 0.1}\n",
        ["bad.yaml:4: checks[0].tolerance: has no effect: match: exact (the default) requires bit-identical runs"]),
    "lora_merge nf4_budget on a check that never runs nf4-lora": (
        "checks:\n  - id: a\n    kind: lora_merge\n    variants: [fp16-lora]\n    nf4_budget: {max_abs_dlogp: 1}\n",
        ["checks[0].nf4_budget: has no effect: nf4_budget judges only the nf4-lora variant"]),
    # -- a kind that can never run on the variants it lists --------------------------------------------
    "example: lora_merge on variants: [fp16]": (
        "checks:\n  - id: a\n    kind: lora_merge\n    variants: [fp16]\n",
        ["bad.yaml:4: checks[0].variants: lora_merge can never judge variant 'fp16'", "has no adapter"]),
    # -- messages that point the wrong way ----------------------------------------------------------------
    "example: defaults: {id: x} (no 'did you mean id')": (
        "defaults: {id: x}\nchecks:\n  - {id: a, kind: greedy, prompt: x}\n",
        ["bad.yaml:1: defaults.id: `id` belongs to each check, not to defaults"]),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_at_collection_in_one_paragraph(tmp_path, case):
    text, words = REFUSED[case]
    message = suite_error(tmp_path, text)
    for needle in words:
        assert needle in message, message
    assert "\n" not in message.strip()


ACCEPTED = {
    "example: merge-key override (<<: *base, then id:)": (
        "checks:\n  - &base {id: a, kind: greedy, prompt: 'The capital of France is', max_new_tokens: 4}\n"
        "  - <<: *base\n    id: b\n    max_new_tokens: 6\n",
        lambda suite: [(c.check.spec.id, c.check.spec.max_new_tokens) for c in suite.checks] == [("a", 4), ("b", 6)]),
    "a tolerance in defaults is fine for save_reload (defaults serve every kind)": (
        "defaults:\n  tolerance: {max_abs_dlogp: 0.2}\nchecks:\n  - {id: a, kind: save_reload}\n"
        "  - {id: b, kind: cache}\n",
        lambda suite: suite.checks[1].check.spec._suite_tolerance is not None),  # layered under the check's own
    "save_reload match: noise with a tolerance": (
        "checks:\n  - {id: a, kind: save_reload, match: noise, tolerance: {tie_gap: 0.3}}\n",
        lambda suite: suite.checks[0].check.spec.match == "noise"),
    "a regex anchored to the empty answer is a real assertion": (
        "checks:\n  - {id: a, kind: expect, prompt: x, expect: [{regex: '^$'}]}\n",
        lambda suite: True),
    "a schema $ref that resolves": (
        "checks:\n  - id: a\n    kind: expect\n    prompt: x\n    expect:\n      - json: {schema: {$defs: {n: {type: "
        "integer}}, properties: {a: {$ref: '#/$defs/n'}}}}\n",
        lambda suite: True),
}


@pytest.mark.parametrize("case", list(ACCEPTED))
def test_accepted(tmp_path, case):
    text, ok = ACCEPTED[case]
    path = tmp_path / "good.yaml"
    path.write_text(text)
    assert ok(load_suite(path))


def test_every_kind_refuses_infinity_in_any_numeric_field(tmp_path):
    """One rule for every kind, whatever the field: a float field set to .inf is a suite error."""
    from pydantic import BaseModel

    def float_fields(model: type[BaseModel], prefix: str = "") -> list[str]:
        found = []
        for name, field in model.model_fields.items():
            key = field.alias or name
            text = str(field.annotation)
            if "float" in text and "dict" not in text and "list" not in text:
                found.append(prefix + key)
            nested = next((a for a in getattr(field.annotation, "__args__", (field.annotation,))
                           if isinstance(a, type) and issubclass(a, BaseModel)), None)
            if nested is not None and prefix.count(".") < 2:
                found += float_fields(nested, f"{prefix}{key}.")
        return found

    seen = 0
    for kind in known_kinds():
        for dotted in float_fields(get_check(kind).Spec):
            *parents, leaf = dotted.split(".")
            value = f"{{{leaf}: .inf}}"
            for parent in reversed(parents):
                value = f"{{{parent}: {value}}}"
            path = tmp_path / f"{kind}-{dotted.replace('.', '_')}.yaml"
            body = value[1:-1]
            path.write_text(f"checks:\n  - {{id: a, kind: {kind}, {body}}}\n")
            with pytest.raises(SuiteError, match=r"is not a finite number"):
                load_suite(path)
            seen += 1
    assert seen >= 10  # tolerances, budgets, sampling, nf4_budget...


def test_lora_merge_gets_items_only_for_adapter_variants_under_a_suite_variants_list(project):
    project.suite("merge", "variants: [fp16, fp16-lora]\nchecks:\n  - {id: m, kind: lora_merge}\n"
                           "  - {id: c, kind: cache}\n")
    result = project.run("--collect-only", "-q")
    out = result.stdout.str()
    assert "merge.yaml::m[fp16-lora]" in out and "merge.yaml::m[fp16]" not in out
    assert "merge.yaml::c[fp16]" in out


WORDS = "checks:\n  - id: words\n    kind: tokenization\n    texts: [Hello]\n    models: [{models}]\n"


@pytest.mark.parametrize("ci", [True, False])
def test_example_models_naming_no_known_model_is_not_judged(project, monkeypatch, ci):
    if ci:
        monkeypatch.setenv("CI", "1")
    project.suite("words", WORDS.format(models="smollm2-135"))  # a typo of smollm2-135m
    result = project.run("-rs")
    result.assert_outcomes(skipped=1)
    assert result.ret == (1 if ci else 0)
    result.stdout.fnmatch_lines([
        "*NOT JUDGED: its `models:` names 'smollm2-135', which is neither a model of the registry models.yaml *"
        "did you mean 'smollm2-135m'?*",
    ])


def test_models_naming_another_registered_model_is_an_ordinary_skip_in_ci(project, monkeypatch):
    monkeypatch.setenv("CI", "1")
    project.suite("words", WORDS.format(models="qwen-0.5b"))
    result = project.run("-rs")
    result.assert_outcomes(skipped=1)
    assert result.ret == 0
    assert "NOT JUDGED" not in result.stdout.str()
