"""``tokenization`` on the real embedded tokenizer: missing -> update -> pass -> tokenizer edited -> fail."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.checks.tokenization import DEFAULT_TEXTS, TokenizationSpec, explain_tokenization

SUITE = """
suite: tok
checks:
  - id: builtin
    kind: tokenization
  - id: short
    kind: tokenization
    texts: ["The quick brown fox.", "Hello world", "<|im_start|>user\\nhi<|im_end|>", ""]
"""

ROUNDTRIP_SUITE = """
suite: tok
checks:
  - id: strict
    kind: tokenization
    texts: ["The quick brown fox.", "hello world"]
  - id: lossy-ok
    kind: tokenization
    roundtrip: none
    texts: ["The quick brown fox.", "hello world"]
"""


def edit_tokenizer_json(folder: Path, edit) -> None:
    path = folder / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    edit(data)
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


# -- pure logic -----------------------------------------------------------------

def test_spec_defaults_and_validation():
    spec = TokenizationSpec.model_validate({"id": "t", "kind": "tokenization"})
    assert spec.roundtrip == "exact"  # the strict comparison unless a suite relaxes it
    with pytest.raises(ValueError):
        TokenizationSpec.model_validate({"id": "t", "kind": "tokenization", "texts": []})
    with pytest.raises(ValueError):
        TokenizationSpec.model_validate({"id": "t", "kind": "tokenization", "roundtrip": "loose"})
    with pytest.raises(ValueError, match="distinct"):
        TokenizationSpec.model_validate({"id": "t", "kind": "tokenization", "texts": ["a", "a"]})
    assert "" in DEFAULT_TEXTS and any("\u200d" in t for t in DEFAULT_TEXTS)
    assert any("<|im_start|>" in t for t in DEFAULT_TEXTS) and any("\t" in t for t in DEFAULT_TEXTS)


def test_explain_names_text_index_ids_and_tokens():
    special = {"bos_token": {"id": 1, "token": "<s>"}}
    expected = {"special_tokens": special, "texts": [
        {"text": "a b", "ids": [5, 6, 7], "tokens": ["a", "Ġb", "c"]},
        {"text": "same", "ids": [9], "tokens": ["same"]},
        {"text": "gone", "ids": [3], "tokens": ["gone"]},
    ]}
    actual = {"special_tokens": {"bos_token": {"id": 2, "token": "<s>"}}, "texts": [
        {"text": "a b", "ids": [5, 8], "tokens": ["a", "Ġb"]},
        {"text": "same", "ids": [9], "tokens": ["SAME"]},
        {"text": "new", "ids": [4], "tokens": ["new"]},
    ]}
    text = explain_tokenization(expected, actual)
    assert "tokenization changed for 2 of 3 texts" in text
    assert "text 'a b': ids differ first at index 1: expected id 6, got 8, tokens 'Ġb' -> 'Ġb' (length 3 -> 2)" in text
    assert "text 'same': same ids, but token strings differ first at index 0: 'same' -> 'SAME'" in text
    assert "special token bos_token: expected {'id': 1, 'token': '<s>'}, got {'id': 2, 'token': '<s>'}" in text
    assert "text 'new' is not in the golden" in text and "golden text 'gone' is no longer checked" in text


# -- the real tokenizer -----------------------------------------------------------

def test_workflow_missing_update_pass(project):
    project.suite("tok", SUITE)
    result = project.run("--variants", "fp16")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(["*Golden file *tokenizer/tok/builtin.json is missing; nothing was written*"])
    assert project.goldens() == []

    project.record("--variants", "fp16", passed=2)
    assert project.goldens() == ["smollm2-135m/tokenizer/tok/builtin.json", "smollm2-135m/tokenizer/tok/short.json"]
    golden = json.loads((project.golden / "smollm2-135m/tokenizer/tok/short.json").read_text(encoding="utf-8"))
    by_text = {e["text"]: e for e in golden["texts"]}
    assert by_text[""]["ids"] == []
    # a special-token look-alike is parsed as the special token, and the golden records it
    assert by_text["<|im_start|>user\nhi<|im_end|>"]["ids"][0] == 1
    assert by_text["<|im_start|>user\nhi<|im_end|>"]["tokens"][0] == "<|im_start|>"
    assert by_text["The quick brown fox."]["tokens"][:2] == ["The", "Ġquick"]
    assert golden["special_tokens"]["bos_token"] == {"id": 1, "token": "<|im_start|>"}
    builtin = json.loads((project.golden / "smollm2-135m/tokenizer/tok/builtin.json").read_text(encoding="utf-8"))
    assert [e["text"] for e in builtin["texts"]] == list(DEFAULT_TEXTS)

    result = project.run("--variants", "fp16,nf4", "-v")
    result.assert_outcomes(passed=2)  # once per model, whatever the variants
    result.stdout.fnmatch_lines(["*suites/tok.yaml::short PASSED*"])
    assert "loaded fp16" not in result.stdout.str()  # the model itself is never loaded


def test_swapped_vocab_ids_round_trip_but_fail_the_golden(project, editable_model, tmp_path):
    model = editable_model("mytok")
    project.suite("tok", SUITE)
    project.run(f"--model={model}", "--variants", "fp16", "--snapshot-update").assert_outcomes(passed=2)

    def swap(data):
        vocab = data["model"]["vocab"]
        vocab["Ġquick"], vocab["Ġbrown"] = vocab["Ġbrown"], vocab["Ġquick"]

    edit_tokenizer_json(model, swap)
    result = project.run(f"--model={model}", "--variants", "fp16")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines([
        "*tokenization changed for 1 of 4 texts (the same text now reaches the model as other ids or tokens):",
        "*text 'The quick brown fox.': ids differ first at index 1: expected id 2365, got 6354, "
        "tokens 'Ġquick' -> 'Ġquick' (length 5 -> 5)",
        "*the tokenizer files changed since this golden was recorded*",
        "*golden: *mytok/tokenizer/tok/short.json",
        "*update with --snapshot-update*",
    ])
    assert "does not round-trip" not in result.stdout.str()


def test_lossy_normalizer_fails_the_round_trip_and_is_never_recorded(project, editable_model, tmp_path):
    model = editable_model("lowercased")
    edit_tokenizer_json(model, lambda data: data.update(normalizer={"type": "Lowercase"}))
    project.suite("tok", ROUNDTRIP_SUITE)
    result = project.run(f"--model={model}", "--variants", "fp16", "--snapshot-update")
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines([
        "*strict: 1 text does not round-trip through the tokenizer (roundtrip: exact):",
        "*'The quick brown fox.': decode(encode(text)) gave 'the quick brown fox.'",
        "*set `roundtrip: strip` or `roundtrip: none`*",
    ])
    assert project.goldens() == ["lowercased/tokenizer/tok/lossy-ok.json"]
