"""``chat_template`` on the real embedded tokenizer: goldens, template edits, doubled BOS, no template."""

from __future__ import annotations

import json
import shutil

import pytest

from harness.checks.chat_template import DEFAULT_CONVERSATIONS, ChatTemplateSpec, explain_chat_template

SUITE = """
suite: chat
checks:
  - id: builtin
    kind: chat_template
  - id: one
    kind: chat_template
    add_generation_prompt: [true]
    conversations:
      hello:
        - {role: user, content: "Hello!"}
"""

BOS_SUITE = """
suite: chat
checks:
  - id: strict
    kind: chat_template
    double_bos: fail
    conversations: {hello: [{role: user, content: "Hello!"}]}
  - id: lenient
    kind: chat_template
    conversations: {hello: [{role: user, content: "Hello!"}]}
"""

NO_TEMPLATE_SUITE = """
suite: chat
checks:
  - id: must-have
    kind: chat_template
  - id: optional
    kind: chat_template
    if_no_chat_template: skip
"""

# tokenizer.json post-processor that makes `tokenizer(text)` prepend BOS (<|im_start|>, id 1)
ADD_BOS = {
    "type": "TemplateProcessing",
    "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
    "pair": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
             {"Sequence": {"id": "B", "type_id": 1}}],
    "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]}},
}


class FakeTokenizer:
    def convert_ids_to_tokens(self, token_id: int) -> str:
        return f"t{token_id}"


# -- pure logic -----------------------------------------------------------------

def test_spec_defaults_and_validation():
    spec = ChatTemplateSpec.model_validate({"id": "c", "kind": "chat_template"})
    assert spec.if_no_chat_template == "fail"  # fail-closed by default
    assert spec.double_bos == "warn"  # Llama 3, Gemma and Mistral ship a BOS-emitting template on a BOS-adding tokenizer
    for bad in ({"conversations": {"x": []}}, {"add_generation_prompt": [True, True]},
                {"conversations": {"x": [{"role": "tool", "content": "hi"}]}}, {"double_bos": "ignore"}):
        with pytest.raises(ValueError):
            ChatTemplateSpec.model_validate({"id": "c", "kind": "chat_template", **bad})


def test_explain_shows_mode_visible_whitespace_diff_and_first_token():
    expected = {"conversations": {"a": {"add_generation_prompt=true": {"text": "x\ny\n", "ids": [1, 2, 3]},
                                        "add_generation_prompt=false": {"text": "x\n", "ids": [1, 2]}},
                                  "old": {"add_generation_prompt=true": {"text": "o", "ids": [9]}}}}
    actual = {"conversations": {"a": {"add_generation_prompt=true": {"text": "x\ny \n", "ids": [1, 2, 4, 3]},
                                      "add_generation_prompt=false": {"text": "x\n", "ids": [1, 2]}}}}
    text = explain_chat_template(expected, actual, FakeTokenizer())
    assert "conversation 'a' (add_generation_prompt=true) changed:" in text
    assert "add_generation_prompt=false" not in text
    assert "-'y\\n'" in text and "+'y \\n'" in text
    assert "first differing token at index 2: expected 't3' (id 3), got 't4' (id 4) (3 -> 4 tokens)" in text
    assert "conversation 'old' is in the golden but no longer checked" in text


# -- the real tokenizer -----------------------------------------------------------

def test_workflow_missing_update_pass_then_template_edit_fails(project, editable_model, tmp_path):
    model = editable_model("mychat")
    project.suite("chat", SUITE)
    result = project.run(f"--model={model}", "--variants", "fp16")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(["*Golden file *mychat/tokenizer/chat/builtin.json is missing; nothing was written*"])
    assert project.goldens() == []

    project.run(f"--model={model}", "--variants", "fp16", "--snapshot-update").assert_outcomes(passed=2)
    assert project.goldens() == ["mychat/tokenizer/chat/builtin.json", "mychat/tokenizer/chat/one.json"]
    golden = json.loads((project.golden / "mychat/tokenizer/chat/builtin.json").read_text(encoding="utf-8"))
    assert set(golden["conversations"]) == set(DEFAULT_CONVERSATIONS)
    user_only = golden["conversations"]["user-only"]
    assert set(user_only) == {"add_generation_prompt=false", "add_generation_prompt=true"}
    assert user_only["add_generation_prompt=true"]["text"].endswith("<|im_start|>assistant\n")
    assert user_only["add_generation_prompt=true"]["ids"][0] == 1
    assert "駅はどこですか" in golden["conversations"]["non-ascii"]["add_generation_prompt=false"]["text"]
    project.run(f"--model={model}", "--variants", "fp16").assert_outcomes(passed=2)

    template = model / "chat_template.jinja"
    template.write_text(template.read_text(encoding="utf-8").replace(
        "message['content'] + '<|im_end|>'", "message['content'] + ' <|im_end|>'"), encoding="utf-8")
    result = project.run(f"--model={model}", "--variants", "fp16")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines([
        "chat.yaml:*: one",
        "conversation 'hello' (add_generation_prompt=true) changed:",
        "*@@ -3,3 +3,3 @@",
        "*'<|im_start|>user\\n'",
        "*-'Hello!<|im_end|>\\n'",
        "*+'Hello! <|im_end|>\\n'",
        "*first differing token at index *: expected '<|im_end|>' (id 2), got 'Ġ' (id *)*",
        "*the tokenizer files changed since this golden was recorded*",
        "*update with --snapshot-update*",
    ])


def test_bos_added_on_top_of_the_template_fails_or_warns(project, editable_model, tmp_path):
    model = editable_model("addsbos")
    path = model / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data["post_processor"] = ADD_BOS
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    project.suite("chat", BOS_SUITE)
    result = project.run(f"--model={model}", "--variants", "fp16", "--snapshot-update")
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines([
        "*strict: the chat template already emits BOS '<|im_start|>' (id 1), and the tokenizer adds BOS "
        "again by default, so `tokenizer(rendered_text)` (add_special_tokens=True) starts with two BOS*",
        "*ChatTemplateWarning*",
        "*lenient: the template emits BOS and the tokenizer adds another by default*double_bos: fail would fail it",
    ])
    assert "encodes chat text with add_special_tokens=False" in result.stdout.str()
    # the failing check wrote nothing; the lenient one recorded its golden
    assert project.goldens() == ["addsbos/tokenizer/chat/lenient.json"]


def test_template_that_renders_bos_twice_always_fails(project, editable_model, tmp_path):
    model = editable_model("twobos")
    template = model / "chat_template.jinja"
    template.write_text("{{ bos_token }}" + template.read_text(encoding="utf-8"), encoding="utf-8")
    project.suite("chat", BOS_SUITE)
    result = project.run(f"--model={model}", "--variants", "fp16", "--snapshot-update")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines([
        "*strict: the chat template renders BOS '<|im_start|>' (id 1) twice at the start of 'hello' "
        "(add_generation_prompt=false), 'hello' (add_generation_prompt=true)*",
        "*lenient: the chat template renders BOS*twice*",
    ])
    assert project.goldens() == []


def test_model_without_a_template_fails_or_skips(project, editable_model, tmp_path):
    """No chat template: a change where goldens were recorded with one; a base model's chat checks do not
    apply where nothing declares it a chat model; a registry entry with chat: true makes it a defect."""
    model = editable_model("base")
    project.suite("chat", NO_TEMPLATE_SUITE)
    project.run(f"--model={model}", "--variants", "fp16", "--snapshot-update").assert_outcomes(passed=2)
    (model / "chat_template.jinja").unlink()
    result = project.run(f"--model={model}", "--variants", "fp16")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(["*'base' has no chat template, and must-have renders chat prompts, but its golden "
                                 "must-have.json was recorded with one: the chat template is gone*"])

    shutil.rmtree(project.golden)
    result = project.run(f"--model={model}", "--variants", "fp16", "-rs")
    result.assert_outcomes(skipped=2)
    result.stdout.fnmatch_lines(["SKIPPED*'base' has no chat template, and must-have renders chat prompts (a base "
                                 "model: no registry entry declares it a chat model), so it does not apply*"])

    with (project.path / "models.yaml").open("a", encoding="utf-8") as registry:
        registry.write(f"\n  base:\n    path: {model}\n    chat: true\n")
    result = project.run("--model=base", "--variants", "fp16", "-rs")
    result.assert_outcomes(failed=1, skipped=1)
    result.stdout.fnmatch_lines([
        "*'base' has no chat template, and must-have renders chat prompts, and its registry entry declares it a "
        "chat model (chat: true)*",
        "SKIPPED*'base' has no chat template, and optional renders chat prompts (the check says "
        "if_no_chat_template: skip)*",
    ])


# Installed as the project's conftest.py: apply_chat_template(tokenize=True) adds special tokens
# (BOS) on top of the rendered text, as a tokenizer subclass overriding it might.
TOKENIZE_ADDS_BOS = """
from transformers import tokenization_utils_base

_apply = tokenization_utils_base.PreTrainedTokenizerBase.apply_chat_template


def _apply_with_bos(self, conversation, *args, tokenize=True, **kwargs):
    out = _apply(self, conversation, *args, tokenize=tokenize, **kwargs)
    if tokenize:
        ids = out["input_ids"] if hasattr(out, "keys") else out
        ids[:0] = [self.bos_token_id]
    return out


tokenization_utils_base.PreTrainedTokenizerBase.apply_chat_template = _apply_with_bos
"""


def test_tokenize_true_path_that_differs_fails(project):
    project.suite("chat", BOS_SUITE)
    project.pytester.makeconftest(TOKENIZE_ADDS_BOS)
    result = project.run("--variants", "fp16", "--snapshot-update")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines([
        "*strict: apply_chat_template(tokenize=True) does not give the ids of rendering the template and "
        "encoding the text without added special tokens:",
        "*'hello' (add_generation_prompt=false): first differing token at index 1: render-then-encode has "
        "'*' (id *), tokenize=True has '<|im_start|>' (id 1) (* vs * tokens); tokenize=True starts with BOS "
        "'<|im_start|>' (id 1) twice",
    ])
    assert project.goldens() == []


REFUSAL_SUITE = """
suite: chat
checks:
  - id: builtin
    kind: chat_template
  - id: with-system
    kind: greedy
    max_new_tokens: 3
    messages:
      - {role: system, content: "You are terse."}
      - {role: user, content: "Hi"}
  - id: user-only
    kind: greedy
    max_new_tokens: 3
    messages:
      - {role: user, content: "Hi"}
  - id: cached
    kind: cache
    max_new_tokens: 2
    caches: [dynamic]
    prompts: ["Hi"]
    chats:
      - [{role: system, content: "You are terse."}, {role: user, content: "Hi"}]
"""

REFUSE_SYSTEM = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                 "{% endif %}")


def test_template_that_refuses_a_system_role(project, editable_model, tmp_path):
    """Gemma's and early Mistral's templates refuse a system message on purpose: a correct model the
    default suites must pass once recorded (the refusal is recorded and judged); a template that starts
    refusing what its goldens were recorded with fails; one that refuses everything fails."""
    model = editable_model("nosystem")
    template = model / "chat_template.jinja"
    original = template.read_text(encoding="utf-8")
    project.suite("chat", REFUSAL_SUITE)
    args = (f"--model={model}", "--variants", "fp16")
    project.run(*args, "--snapshot-update").assert_outcomes(passed=4)
    before = {p: (project.golden / p).read_bytes() for p in project.goldens()}

    template.write_text(REFUSE_SYSTEM + original, encoding="utf-8")
    result = project.run(*args)
    result.assert_outcomes(failed=2, passed=2)
    result.stdout.fnmatch_lines([
        "*conversation 'system-user' (add_generation_prompt=false): the template rendered it and now refuses it "
        "('System role not supported')",
        "*the chat template of 'nosystem' now refuses these messages ('System role not supported', its own "
        "raise_exception), but its golden with-system.json was recorded with them rendered*",
    ])
    assert {p: (project.golden / p).read_bytes() for p in project.goldens()} == before

    shutil.rmtree(project.golden)
    update = project.run(*args, "--snapshot-update", "-rs")
    update.assert_outcomes(passed=3, skipped=1)
    update.stdout.fnmatch_lines([
        "*builtin: the chat template refuses 2 of 8 renderings on purpose*'System role not supported'*",
        "*cached?fp16?: 1 chat(s) left out, the model does not take them (chat 0 ('Hi'): its chat template "
        "refuses it, 'System role not supported'); judged on the other 1 prompt(s)",
        "SKIPPED*chat.yaml:6: the chat template of 'nosystem' refuses these messages ('System role not supported'*"
        "does not apply to this model*",
    ])
    golden = json.loads((project.golden / "nosystem/tokenizer/chat/builtin.json").read_text(encoding="utf-8"))
    assert golden["conversations"]["system-user"]["add_generation_prompt=true"] == {
        "refused": "System role not supported"}
    assert "nosystem/cpu/fp16/chat/with-system.json" not in project.goldens()
    project.run(*args).assert_outcomes(passed=3, skipped=1)

    template.write_text(original, encoding="utf-8")  # accepting the system role again is a change too
    project.run(*args, "-k", "builtin").stdout.fnmatch_lines([
        "*conversation 'system-user' (add_generation_prompt=false): the template refused it "
        "('System role not supported') and now renders it*"])

    template.write_text("{{ raise_exception('no chat here') }}", encoding="utf-8")
    result = project.run(*args, "-k", "builtin", "--snapshot-update")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*builtin: the chat template refuses every conversation of this check:*"])
