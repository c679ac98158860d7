"""``chat_template``: rendered chat prompts and their ids are a golden, BOS is not doubled, and
``apply_chat_template(tokenize=True)`` gives the same ids as rendering then encoding.

Runs once per model. The chat template decides what an instruct model sees:
a changed system default, a lost newline or a moved special token changes
every chat prompt without failing anything else, so the rendering of a few
conversations, with and without the generation prompt, is recorded.

The doubled-BOS rule. The harness (like ``apply_chat_template(tokenize=True)``)
encodes rendered chat text with ``add_special_tokens=False``, so a template
that emits BOS is right for it. Two cases are still defects:

* the template itself renders BOS twice: always a failure;
* the template emits BOS and the tokenizer also adds BOS by default, so
  ``tokenizer(rendered_text)``, the obvious call, starts with two BOS: users of
  the model who do that get a degraded prompt. Reported per ``double_bos``:
  ``warn`` by default (a warning and a note in the summary), because the model families
  that ship this way on purpose are the common ones (Llama 3, Gemma, Mistral: a template
  opening with ``{{ bos_token }}`` and a tokenizer that adds BOS), and the default suites
  must pass on a correct model; ``fail`` for a project that wants it fixed.

A template that does not emit BOS while the tokenizer adds one by default is
not flagged: many chat models (ChatML) are trained without BOS.

The tokenize=True rule. Serving and training code mostly calls
``apply_chat_template(tokenize=True)``; the harness and many users render the
text and encode it without added special tokens. The two must give the same
ids (transformers #37686 is a case where they did not), and the ids must not
start with two BOS.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Callable
from typing import Any, Literal

from pydantic import Field, field_validator

from harness.checks.base import Check, CheckContext, CheckSpec, register_check
from harness.observe.prompts import (
    IF_NO_CHAT_TEMPLATE_HELP, Message, NoChatTemplate, TemplateRefusal, missing_template, render_chat,
)
from harness.errors import CheckFailure

DEFAULT_CONVERSATIONS: dict[str, list[Message]] = {
    "system-user": [
        Message(role="system", content="You are a concise assistant."),
        Message(role="user", content="What is the capital of France?"),
    ],
    "user-only": [Message(role="user", content="Hello!")],
    "multi-turn": [
        Message(role="user", content="Can you help me with arithmetic?"),
        Message(role="assistant", content="Of course. What would you like to compute?"),
        Message(role="user", content="What is 12 times 7?"),
    ],
    "non-ascii": [
        Message(role="user", content="Übersetze: «Où est la gare ?» 駅はどこですか？ 🚉\tfin"),
    ],
}


class ChatTemplateWarning(UserWarning):
    """A chat-template problem the suite chose to report without failing."""


class ChatTemplateSpec(CheckSpec):
    """The chat template's rendering of a few conversations and its token ids are a golden (once per model);
    BOS must not be doubled, and `apply_chat_template(tokenize=True)` must give the same ids."""

    kind: Literal["chat_template"]
    conversations: dict[str, list[Message]] | None = Field(None, min_length=1, description=(
        "Conversations to render, by name (each a list of `{role, content}` messages). Default: built-in ones "
        "(system + user, user only, multi-turn, non-ASCII)."))
    add_generation_prompt: list[bool] = Field(default_factory=lambda: [False, True], min_length=1,
                                              description="Render each conversation without and/or with the "
                                                          "generation prompt.")
    if_no_chat_template: Literal["fail", "skip"] = Field("fail", description=IF_NO_CHAT_TEMPLATE_HELP)
    double_bos: Literal["fail", "warn"] = Field("warn", description=(
        "A template that emits BOS while the tokenizer also adds one (so `tokenizer(rendered)` starts with two): "
        "`warn` (common in Llama 3, Gemma, Mistral) or `fail`. A template that renders BOS twice always fails."))

    @field_validator("conversations")
    @classmethod
    def _non_empty(cls, value: dict[str, list[Message]] | None) -> dict[str, list[Message]] | None:
        for name, messages in (value or {}).items():
            if not messages:
                raise ValueError(f"conversation {name!r} has no messages")
        return value

    @field_validator("add_generation_prompt")
    @classmethod
    def _unique(cls, value: list[bool]) -> list[bool]:
        if len(set(value)) != len(value):
            raise ValueError("list each of true/false at most once")
        return value


def mode_key(add_generation_prompt: bool) -> str:
    return f"add_generation_prompt={'true' if add_generation_prompt else 'false'}"


@register_check("chat_template")
class ChatTemplateCheck(Check[ChatTemplateSpec]):
    Spec = ChatTemplateSpec
    uses_goldens = True
    per_variant = False

    @property
    def conversations(self) -> dict[str, list[Message]]:
        return dict(self.spec.conversations) if self.spec.conversations is not None else dict(DEFAULT_CONVERSATIONS)

    def run(self, ctx: CheckContext) -> None:
        __tracebackhide__ = True
        tokenizer = ctx.tokenizer
        rendered: dict[str, dict[str, Any]] = {}
        errors: list[str] = []
        bos_problems: list[str] = []
        double_on_encode: list[str] = []
        tokenize_path: list[str] = []
        refusals: list[str] = []
        for name, messages in self.conversations.items():
            rendered[name] = {}
            for flag in self.spec.add_generation_prompt:
                label = f"{name!r} ({mode_key(flag)})"
                try:
                    text = render_chat(tokenizer, messages, add_generation_prompt=flag)
                except NoChatTemplate:
                    raise missing_template(
                        ctx.pool.resolved, what=f"{self.spec.id} renders chat prompts",
                        skip=self.spec.if_no_chat_template == "skip", against=ctx.recorded_against()) from None
                except TemplateRefusal as exc:  # the template's own contract: recorded, and judged as a golden
                    rendered[name][mode_key(flag)] = {"refused": exc.reason}
                    refusals.append(f"{label}: {exc.reason!r}")
                    continue
                except Exception as exc:  # noqa: BLE001 - a template error is the finding
                    errors.append(f"{label}: the template raised {type(exc).__name__}: {exc}")
                    continue
                ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
                rendered[name][mode_key(flag)] = {"text": text, "ids": ids}
                path_problem = _tokenize_path_problem(tokenizer, messages, flag, ids)
                if path_problem:
                    tokenize_path.append(f"{label}: {path_problem}")
                problem = _bos_problem(tokenizer, text, ids)
                if problem == "template":
                    bos_problems.append(label)
                elif problem == "encode":
                    double_on_encode.append(label)
        if errors:
            raise CheckFailure(
                f"{self.spec.id}: the chat template failed to render:\n"
                + "\n".join(f"  - {e}" for e in errors)
                + "\nFix: correct the template, or give `conversations:` that this model supports "
                "(some templates refuse a system message or require alternating roles)."
            )
        _judge_refusals(self.spec.id, refusals, total=sum(len(modes) for modes in rendered.values()), note=ctx.note)
        bos = f"{tokenizer.bos_token!r} (id {tokenizer.bos_token_id})"
        if bos_problems:
            raise CheckFailure(
                f"{self.spec.id}: the chat template renders BOS {bos} twice at the start of "
                f"{', '.join(bos_problems)}. The model sees a doubled BOS on every chat prompt, whatever "
                "the caller does. Fix: emit `{{ bos_token }}` once in the template."
            )
        if double_on_encode:
            message = (
                f"{self.spec.id}: the chat template already emits BOS {bos}, and the tokenizer adds BOS again "
                "by default, so `tokenizer(rendered_text)` (add_special_tokens=True) starts with two BOS "
                f"for {', '.join(double_on_encode)}. The harness, like apply_chat_template(tokenize=True), "
                "encodes chat text with add_special_tokens=False and is not affected, but code that "
                "renders then encodes with the defaults feeds the model a doubled BOS. Fix: drop "
                "`{{ bos_token }}` from the template or stop the tokenizer adding BOS "
                "(add_bos_token: false); double_bos: warn (the default) reports it, fail fails it."
            )
            if self.spec.double_bos == "fail":
                raise CheckFailure(message)
            warnings.warn(message, ChatTemplateWarning, stacklevel=1)
            ctx.note(f"{self.spec.id}: the template emits BOS and the tokenizer adds another by default "
                     "(`tokenizer(rendered_text)` starts with two BOS; the harness encodes without); "
                     "double_bos: fail would fail it")
        if tokenize_path:
            raise CheckFailure(
                f"{self.spec.id}: apply_chat_template(tokenize=True) does not give the ids of rendering the "
                "template and encoding the text without added special tokens:\n"
                + "\n".join(f"  - {p}" for p in tokenize_path)
                + "\nCode that calls apply_chat_template(tokenize=True) (most serving and training code) and "
                "code that renders then encodes feed the model different prompts. Fix: the tokenizer's "
                "apply_chat_template or its encoding of special-token text; every chat prompt must start with "
                "at most one BOS."
            )
        ctx.record(chat_template_renders=sum(len(v) for v in rendered.values()))
        ctx.assert_golden({"conversations": rendered},
                          lambda exp, act: explain_chat_template(exp, act, tokenizer))


def _judge_refusals(check_id: str, refusals: list[str], *, total: int, note: Callable[[str], None]) -> None:
    """Renderings the template refused on purpose are part of the golden and said in a note; a template
    that refuses every one renders no chat at all, which no chat model's does."""
    __tracebackhide__ = True
    if not refusals:
        return
    if len(refusals) == total:
        raise CheckFailure(
            f"{check_id}: the chat template refuses every conversation of this check:\n"
            + "\n".join(f"  - {r}" for r in refusals)
            + "\nA chat model's template renders at least a plain user message, so this one cannot serve chat. "
            "Fix: correct the template (its raise_exception conditions), or add a conversation it takes."
        )
    note(f"{check_id}: the chat template refuses {len(refusals)} of {total} renderings on purpose (its own "
         f"raise_exception), recorded in the golden: {'; '.join(refusals)}")


def _refusal_change(expected: dict[str, Any], actual: dict[str, Any]) -> str:
    """How a rendering changed where the template refused it on one side."""
    if "refused" in expected and "refused" in actual:
        return f"the template refused it with {expected['refused']!r}, now with {actual['refused']!r}"
    if "refused" in expected:
        return (f"the template refused it ({expected['refused']!r}) and now renders it: "
                f"{' '.join(_visible_lines(actual.get('text', ''))[:3])}")
    return f"the template rendered it and now refuses it ({actual['refused']!r})"


def _bos_problem(tokenizer: Any, text: str, ids: list[int]) -> str | None:
    """``template``: the rendering holds BOS twice; ``encode``: default encoding adds a second."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None or not ids or ids[0] != bos:
        return None
    if ids[:2] == [bos, bos]:
        return "template"
    default = list(tokenizer(text)["input_ids"])
    if default[:2] == [bos, bos]:
        return "encode"
    return None


def _tokenize_path_problem(tokenizer: Any, messages: list[Message], flag: bool, ids: list[int]) -> str | None:
    """How ``apply_chat_template(tokenize=True)`` differs from render-then-encode, or a doubled BOS in it."""
    out = tokenizer.apply_chat_template([m.model_dump() for m in messages], tokenize=True,
                                        add_generation_prompt=flag)
    direct = list(out["input_ids"] if hasattr(out, "keys") else out)
    if direct and isinstance(direct[0], list):  # a batch of one
        direct = direct[0]
    bos = getattr(tokenizer, "bos_token_id", None)
    if direct == ids:
        return None  # a doubled BOS in these ids is the template's, reported by _bos_problem
    index = next((i for i, (a, b) in enumerate(zip(ids, direct)) if a != b), min(len(ids), len(direct)))
    doubled = (f"; tokenize=True starts with BOS {tokenizer.bos_token!r} (id {bos}) twice"
               if bos is not None and direct[:2] == [bos, bos] else "")
    return (f"first differing token at index {index}: render-then-encode has {_token(tokenizer, ids, index)}, "
            f"tokenize=True has {_token(tokenizer, direct, index)} ({len(ids)} vs {len(direct)} tokens){doubled}")


def _visible_lines(text: str) -> list[str]:
    """One repr per line, so that spaces, tabs, and a lost or added newline are visible."""
    return [repr(line) for line in text.splitlines(keepends=True)] or ["''"]


def _token(tokenizer: Any, ids: list[int], index: int) -> str:
    if index >= len(ids):
        return "end of prompt"
    token_id = ids[index]
    return f"{tokenizer.convert_ids_to_tokens(token_id)!r} (id {token_id})"


def explain_chat_template(expected: dict[str, Any], actual: dict[str, Any], tokenizer: Any) -> str:
    """Which conversation and mode changed, a visible-whitespace diff, and the first differing token."""
    lines: list[str] = []
    exp_all, act_all = expected.get("conversations", {}), actual.get("conversations", {})
    for name in sorted(set(exp_all) | set(act_all)):
        if name not in act_all:
            lines.append(f"conversation {name!r} is in the golden but no longer checked")
            continue
        if name not in exp_all:
            lines.append(f"conversation {name!r} is not in the golden (new in the suite)")
            continue
        for mode in sorted(set(exp_all[name]) | set(act_all[name])):
            exp, act = exp_all[name].get(mode), act_all[name].get(mode)
            if exp == act:
                continue
            if exp is None or act is None:
                lines.append(f"conversation {name!r} ({mode}): "
                             + ("not in the golden" if exp is None else "no longer rendered"))
                continue
            if "refused" in exp or "refused" in act:
                lines.append(f"conversation {name!r} ({mode}): {_refusal_change(exp, act)}")
                continue
            lines.append(f"conversation {name!r} ({mode}) changed:")
            if exp["text"] != act["text"]:
                diff = list(difflib.unified_diff(
                    _visible_lines(exp["text"]), _visible_lines(act["text"]),
                    "expected", "actual", lineterm="", n=1,
                ))
                lines.extend("    " + d for d in diff[:30])
                if len(diff) > 30:
                    lines.append(f"    ... ({len(diff) - 30} more diff lines)")
            exp_ids, act_ids = exp["ids"], act["ids"]
            index = next((i for i, (a, b) in enumerate(zip(exp_ids, act_ids)) if a != b),
                         None if len(exp_ids) == len(act_ids) else min(len(exp_ids), len(act_ids)))
            if index is not None:
                lines.append(
                    f"  first differing token at index {index}: expected {_token(tokenizer, exp_ids, index)}, "
                    f"got {_token(tokenizer, act_ids, index)} ({len(exp_ids)} -> {len(act_ids)} tokens)"
                )
    return "\n".join(lines) or "the observation differs from the golden"
