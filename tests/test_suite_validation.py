"""Bad suites: one collection error naming file, line and key; the other suites still run."""

from __future__ import annotations

import pytest

from conftest import suite_error
from harness.suites.spec import load_suite

GOOD = """
suite: good
checks:
  - id: capital
    kind: greedy
    prompt: "The capital of France is"
    max_new_tokens: 3
"""

CASES = {
    "unknown_kind": (
        "checks:\n  - id: a\n    kind: greddy\n    prompt: x\n",
        "bad.yaml:3: checks[0].kind: unknown check kind 'greddy'. Fix: did you mean 'greedy'?",
    ),
    "misspelled_key": (
        "checks:\n  - id: a\n    kind: greedy\n    prompt: x\n    max_new_token: 3\n",
        "bad.yaml:5: checks[0].max_new_token: unknown key. Fix: did you mean 'max_new_tokens'?",
    ),
    "wrong_type": (
        "checks:\n  - id: a\n    kind: greedy\n    prompt: x\n    max_new_tokens: many\n",
        "bad.yaml:5: checks[0].max_new_tokens: expected a whole number, but YAML read text (quoted, or not a number "
        "YAML recognizes) (you wrote 'many')",
    ),
    "boolean_as_a_number": (
        "checks:\n  - id: a\n    kind: greedy\n    prompt: x\n    max_new_tokens: true\n",
        "bad.yaml:5: checks[0].max_new_tokens: expected a whole number, but YAML read a boolean (YAML reads "
        "true/false, yes/no, on/off as booleans) (you wrote 'true')",
    ),
    "quoted_number": (
        "checks:\n  - id: a\n    kind: greedy\n    prompt: x\n    max_new_tokens: \"32\"\n",
        "bad.yaml:5: checks[0].max_new_tokens: expected a whole number, but YAML read text",
    ),
    "boolean_as_a_budget": (
        "checks:\n  - id: a\n    kind: drift\n    reference: fp16\n    prompts: [x]\n"
        "    budgets: {smollm2-135m: {nf4: {max_mean_kl: yes}}}\n",
        "bad.yaml:6: checks[0].budgets.smollm2-135m.nf4.max_mean_kl: expected a number, but YAML read a boolean",
    ),
    "nan_budget": (
        "checks:\n  - id: a\n    kind: drift\n    reference: fp16\n    prompts: [x]\n"
        "    budgets: {smollm2-135m: {cpu: {nf4: {max_mean_kl: .nan}}}}\n",
        "bad.yaml:6: '.nan' is not a number: a budget or tolerance of NaN passes every comparison",
    ),
    "float_as_a_count": (
        "checks:\n  - id: a\n    kind: greedy\n    prompt: x\n    max_new_tokens: 1e3\n",
        "bad.yaml:5: checks[0].max_new_tokens: expected a whole number, but YAML read a decimal number (you wrote '1e3')",
    ),
    "empty_variants_on_a_check": (
        "checks:\n  - id: a\n    kind: greedy\n    prompt: x\n    variants: []\n",
        "bad.yaml:5: checks[0].variants: an empty list selects no variant, so the check would never run; "
        "remove the key (all variants) or list variants",
    ),
    "empty_variants_on_a_suite": (
        "variants: []\nchecks:\n  - id: a\n    kind: greedy\n    prompt: x\n",
        "bad.yaml:1: variants: an empty list selects no variant, so no per-variant check of this suite would run. "
        "Fix: remove the key (all variants) or list variants",
    ),
    "empty_greedy_prompt": (
        "checks:\n  - id: a\n    kind: greedy\n    prompt: \"\"\n",
        "bad.yaml:4: checks[0].prompt: an empty prompt gives the model nothing to continue",
    ),
    "empty_greedy_messages": (
        "checks:\n  - id: a\n    kind: greedy\n    messages: []\n",
        "bad.yaml:4: checks[0].messages: an empty conversation has nothing to render",
    ),
    "empty_drift_prompt": (
        "checks:\n  - id: a\n    kind: drift\n    prompts: [\"ok\", \"\"]\n",
        "bad.yaml:4: checks[0].prompts[1]: an empty prompt gives the model nothing to continue",
    ),
    "empty_drift_chat": (
        "checks:\n  - id: a\n    kind: drift\n    chats: [[]]\n",
        "bad.yaml:4: checks[0].chats[0]: an empty conversation has nothing to render",
    ),
    "id_too_long_for_a_file_name": (
        "checks:\n  - id: " + "a" * 300 + "\n    kind: greedy\n    prompt: x\n",
        "bad.yaml:2: checks[0].id: it names a file or folder of the golden tree, so it is at most 100 characters; "
        "this one has 300",
    ),
    "suite_name_too_long": (
        "suite: " + "s" * 200 + "\nchecks:\n  - id: a\n    kind: greedy\n    prompt: x\n",
        "bad.yaml:1: suite: it names a file or folder of the golden tree, so it is at most 100 characters; "
        "this one has 200",
    ),
    "lone_surrogate": (
        "checks:\n  - id: a\n    kind: tokenization\n    texts: [\"ok\", \"bad \\ud800 text\"]\n",
        "bad.yaml:4: the text holds a lone surrogate \\ud800, which is not a character",
    ),
    "nested_ten_thousand_deep": (
        "checks:\n  - id: a\n    kind: tokenization\n    texts: " + "[" * 10000 + "]" * 10000 + "\n",
        "bad.yaml: this suite is nested too deeply to be read",
    ),
    "missing_field": (
        "checks:\n  - kind: greedy\n    prompt: x\n",
        "bad.yaml:2: checks[0].id: required field is missing",
    ),
    "duplicate_id": (
        "checks:\n  - id: a\n    kind: greedy\n    prompt: x\n  - id: a\n    kind: greedy\n    prompt: y\n",
        "bad.yaml:5: checks[1].id: duplicate check id 'a' (first at line 2)",
    ),
    "unsafe_tag": (
        "checks:\n  - id: a\n    kind: greedy\n    prompt: !!python/object/apply:os.system ['touch pwned']\n",
        "bad.yaml:4: unsafe or unknown YAML tag tag:yaml.org,2002:python/object/apply:os.system",
    ),
    "does_not_parse": (
        "checks:\n  - id: a\n    kind: greedy\n   prompt: x\n",
        "bad.yaml:4: YAML does not parse",
    ),
    "list_not_mapping": (
        "- id: a\n  kind: greedy\n",
        "bad.yaml:1: a suite is a mapping with 'checks', but this file holds a YamlList",
    ),
    "unknown_variant": (
        "checks:\n  - id: a\n    kind: greedy\n    prompt: x\n    variants: [fp16, nf8]\n",
        "bad.yaml:5: checks[0].variants: unknown variant 'nf8'",
    ),
    "duplicate_key": (
        "checks:\n  - id: a\n    kind: greedy\n    prompt: x\n    prompt: y\n",
        "bad.yaml:5: duplicate key 'prompt' (first at line 4)",
    ),
    "both_prompt_and_messages": (
        "checks:\n  - id: a\n    kind: greedy\n    prompt: x\n    messages: [{role: user, content: y}]\n",
        "bad.yaml:2: checks[0]: give exactly one of 'prompt' (raw text) or 'messages' (chat)",
    ),
    "unknown_default": (
        "defaults: {max_tokens: 3}\nchecks:\n  - id: a\n    kind: greedy\n    prompt: x\n",
        "bad.yaml:1: defaults.max_tokens: unknown key in defaults. Fix: did you mean 'max_new_tokens'?",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_error_message(tmp_path, case):
    text, expected = CASES[case]
    message = suite_error(tmp_path, text)
    assert message.startswith(expected), message
    assert not (tmp_path / "pwned").exists()


def test_float_exponent_is_a_float_and_defaults_apply(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("defaults: {max_new_tokens: 5}\nchecks:\n  - {id: a, kind: greedy, prompt: x}\n"
                    "  - {id: b, kind: greedy, prompt: y, max_new_tokens: 2}\n")
    suite = load_suite(path)
    assert [c.check.spec.max_new_tokens for c in suite.checks] == [5, 2]
    from harness.suites.yamlload import load_yaml

    path.write_text("atol: 1e-5\n")
    assert load_yaml(path) == {"atol": 1e-05}
    path.write_text('text: "smile \\ud83d\\ude00"\n')  # JSON-style surrogate pair: one character
    assert load_yaml(path) == {"text": "smile \U0001F600"}


def test_bad_suite_is_a_collection_error_of_that_file_only(project):
    project.suite("good", GOOD)
    project.suite("bad", CASES["unknown_kind"][0])
    result = project.run("--variants", "fp16", "--snapshot-update")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines([
        "*ERROR collecting suites/bad.yaml*",
        "*bad.yaml:3: checks[[]0[]].kind: unknown check kind 'greddy'. Fix: did you mean 'greedy'?*",
    ])
    assert "Traceback" not in result.stdout.str()
    assert project.goldens() == ["smollm2-135m/cpu/fp16/good/capital.json"]


def test_items_are_named_by_check_and_variant_and_report_the_yaml_line(project):
    project.suite("good", GOOD)
    result = project.run("--variants", "fp16,nf4", "--collect-only", "-q")
    result.stdout.fnmatch_lines(["suites/good.yaml::capital[[]fp16[]]", "suites/good.yaml::capital[[]nf4[]]"])
    selected = project.run("--variants", "fp16,nf4", "--collect-only", "-q", "-k", "nf4")
    selected.stdout.fnmatch_lines(["suites/good.yaml::capital[[]nf4[]]", "*1/2 tests collected (1 deselected)*"])


def test_items_carry_no_unknown_mark_without_pytest_xdist(project):
    """The main job installs no pytest-xdist; the load-group mark every item carries is still a known one."""
    project.suite("good", GOOD)
    result = project.run("--variants", "fp16", "--collect-only", "-q", "-p", "no:xdist",
                         "-W", "error::pytest.PytestUnknownMarkWarning")
    assert result.ret == 0, result.stdout.str()
    assert "PytestUnknownMarkWarning" not in result.stdout.str()
