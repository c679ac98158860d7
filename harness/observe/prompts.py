"""Prompts as suites write them (raw text or chat messages), turned into model inputs."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from harness.errors import CheckFailure

if TYPE_CHECKING:
    from harness.models.sources import ResolvedModel


def _some_text(value: str) -> str:
    if not value:
        raise ValueError("an empty prompt gives the model nothing to continue; write the text it should continue")
    return value


class Message(BaseModel):
    """One message of a chat."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Literal["system", "user", "assistant"] = Field(description="Who speaks.")
    content: str = Field(description="What they say.")


def _some_messages(value: list[Message]) -> list[Message]:
    if not value:
        raise ValueError("an empty conversation has nothing to render; list at least one message "
                         "(role and content)")
    return value


# What suites may write as a raw prompt and as a chat: validated at collection, so that an
# empty one is a suite error with its line, not a crash inside generate().
PromptText = Annotated[str, AfterValidator(_some_text)]
ChatMessages = Annotated[list[Message], AfterValidator(_some_messages)]

# The suite reference's words for the prompt keys several kinds share (one text, one meaning).
PROMPT_HELP = ("Raw text the model continues, encoded with the tokenizer's defaults, no chat template. "
               "Give exactly one of `prompt` and `messages`.")
MESSAGES_HELP = ("A chat: a list of `{role, content}` (role `system`, `user` or `assistant`), rendered with the "
                 "model's chat template and its generation prompt. Give exactly one of `prompt` and `messages`.")
PROMPTS_HELP = ("Raw prompts, each run on its own. Where neither `prompts` nor `chats` is given: one built-in "
                "prompt, \"The capital of France is\".")
CHATS_HELP = "Chats (each a list of `{role, content}` messages), rendered with the model's chat template."
IF_NO_CHAT_TEMPLATE_HELP = ("A model with no chat template: `fail`, or `skip` this check. Either way a model "
                            "that no registry entry declares a chat model (`chat: true`) skips, saying so.")


class NoChatTemplate(Exception):
    """The tokenizer has no chat template; the check decides whether that skips or fails."""


class ChatTemplateError(CheckFailure):
    """The model's chat template does not parse, or raised while rendering these messages."""


class TemplateRefusal(ChatTemplateError):
    """The template's own ``raise_exception(...)`` refused these messages.

    Many templates refuse on purpose what their model was not trained on (Gemma's and early
    Mistral's: no system role; roles that do not alternate). That is a property of the model,
    which the ``chat_template`` kind records, not a defect: a check whose messages the model
    refuses does not apply to it (unless its golden says the template once rendered them).
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_chat(tokenizer: Any, messages: list[Message], *, add_generation_prompt: bool) -> str:
    """The chat text the model sees; a broken template is this check's failure, naming the problem."""
    __tracebackhide__ = True
    if not has_chat_template(tokenizer):
        raise NoChatTemplate("the tokenizer has no chat template")
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(
            [m.model_dump() for m in messages], tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except TemplateError as exc:
        if type(exc) is TemplateError:  # what transformers' raise_exception() raises: the template's own refusal
            raise TemplateRefusal(
                f"the model's chat template refuses these messages: {exc} (its own raise_exception). Fix: "
                "messages this model takes (many templates refuse a system message or roles that do not "
                "alternate); the chat_template check records what the template refuses", reason=str(exc)
            ) from None
        where = f" (template line {exc.lineno})" if getattr(exc, "lineno", None) else ""
        raise ChatTemplateError(
            f"the model's chat template cannot render these messages{where}: {type(exc).__name__}: {exc}. "
            "Fix: correct chat_template in the model's tokenizer_config.json (or chat_template.jinja); "
            "the chat_template check shows the problem for each conversation. A template that refuses "
            "some roles or orders needs messages it accepts."
        ) from None


def encode_prompt(tokenizer: Any, *, prompt: str | None, messages: list[Message] | None) -> list[int]:
    """Token ids the model sees. Chat text already holds its special tokens, so none are added."""
    __tracebackhide__ = True
    if messages is not None:
        text = render_chat(tokenizer, messages, add_generation_prompt=True)
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    else:
        assert prompt is not None
        text = prompt
        ids = list(tokenizer(prompt)["input_ids"])
    if not ids:
        raise CheckFailure(
            f"the prompt {text[:60]!r} encodes to no tokens with this tokenizer, so the model has nothing "
            "to continue. Fix: give a prompt with text this tokenizer keeps."
        )
    return ids


def encode_or_skip(tokenizer: Any, *, model: ResolvedModel, prompt: str | None, messages: list[Message] | None,
                   if_no_chat_template: str, recorded: Callable[[], str | None] | None = None) -> list[int]:
    """``encode_prompt`` for a check: what a model whose template cannot render these messages does.

    Messages the template refuses on purpose (``TemplateRefusal``) skip: the check does not apply
    to this model. A model with no chat template skips where it may be a base model
    (``base_model_reason`` of its registry entry) or the suite says ``if_no_chat_template: skip``, and fails
    where it is declared a chat model. Either way, where ``recorded`` names what this item was
    recorded against (its golden, or in reference mode OLD's run), the template rendered these
    messages once and does not now, which is a change of the model, and fails (asked only then).
    """
    __tracebackhide__ = True
    import pytest

    model_name = model.name
    try:
        return encode_prompt(tokenizer, prompt=prompt, messages=messages)
    except TemplateRefusal as exc:
        against = recorded() if recorded is not None else None
        if against is not None:
            raise CheckFailure(
                f"the chat template of {model_name!r} now refuses these messages ({exc.reason!r}, its own "
                f"raise_exception), but {against} was recorded with them rendered: the chat template changed. "
                "Fix: restore the template; if refusing them is intended, delete that golden and write messages "
                "the model takes"
            ) from None
        pytest.skip(f"the chat template of {model_name!r} refuses these messages ({exc.reason!r}, its own "
                    "raise_exception), so this check does not apply to this model; the chat_template check "
                    "records the refusal. To judge it here, write messages the model takes")
    except NoChatTemplate:
        raise missing_template(model, what="this check renders chat messages", skip=if_no_chat_template == "skip",
                               against=recorded() if recorded is not None else None) from None


def base_model_reason(entry: Any) -> str | None:
    """Why a model with no chat template may be a base model, or None where its registry entry says
    ``chat: true`` (then a missing template is a defect). A folder, GGUF or hub name given on the
    command line declares nothing: whether it has a template is all there is to go on."""
    if "chat" not in entry.model_fields_set:
        return "no registry entry declares it a chat model"
    return None if entry.chat else "its registry entry says chat: false"


def missing_template(model: ResolvedModel, *, what: str, skip: bool, against: str | None) -> BaseException:
    """The skip or failure of a check that renders chat messages on a model with no chat template."""
    import pytest

    base = base_model_reason(model.entry)
    message = f"{model.name!r} has no chat template, and {what}"
    if against is not None:
        return CheckFailure(f"{message}, but {against} was recorded with one: the chat template is gone. Fix: restore "
                            "chat_template in the tokenizer files (tokenizer_config.json or chat_template.jinja)")
    if skip:
        return pytest.skip.Exception(f"{message} (the check says if_no_chat_template: skip)", _use_item_location=True)
    if base is not None:
        return pytest.skip.Exception(f"{message} (a base model: {base}), so it does not apply; `chat: true` on the "
                                     "model's registry entry makes a missing template fail", _use_item_location=True)
    return CheckFailure(f"{message}, and its registry entry declares it a chat model (chat: true). Fix: restore its "
                        "chat template; for a base model set chat: false (or use `prompt:`, or "
                        "if_no_chat_template: skip on the check)")


def encode_chat_or_why(tokenizer: Any, messages: list[Message], *, model: ResolvedModel,
                       what: str) -> tuple[list[int] | None, str | None]:
    """One chat of a many-prompt check: its ids, or why this model does not take it (its template
    refuses it, or a base model has no template) for ``leave_out_refused``. A model declared a
    chat model (``chat: true``) with no template fails instead."""
    __tracebackhide__ = True
    try:
        return encode_prompt(tokenizer, prompt=None, messages=messages), None
    except TemplateRefusal as exc:
        return None, f"its chat template refuses it, {exc.reason!r}"
    except NoChatTemplate:
        base = base_model_reason(model.entry)
        if base is None:
            raise missing_template(model, what=what, skip=False, against=None) from None
        return None, f"no chat template ({base})"


def leave_out_refused(refused: list[str], *, kept: int, subject: str, note: Callable[[str], None]) -> None:
    """Chats of a many-prompt check that the model does not take (its template refuses them, or a base
    model has none) are left out, said in a note; with none left the check does not apply to this
    model and skips (``refused``: "label: why" lines)."""
    __tracebackhide__ = True
    import pytest

    if not refused:
        return
    what = "; ".join(refused)
    if not kept:
        pytest.skip(f"{subject}: the model takes none of this check's prompts ({what}), so the check does not "
                    "apply to this model")
    note(f"{subject}: {len(refused)} chat(s) left out, the model does not take them ({what}); judged on the "
         f"other {kept} prompt(s)")


def context_limit(model: Any) -> int | None:
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def assert_fits_context(model: Any, n_prompt: int, max_new_tokens: int, *, what: str) -> None:
    """A prompt past the context would be silently truncated or produce garbage: refuse it."""
    __tracebackhide__ = True
    limit = context_limit(model)
    if limit is not None and n_prompt + max_new_tokens > limit:
        raise CheckFailure(
            f"{what}: the prompt is {n_prompt} tokens and max_new_tokens is {max_new_tokens}, "
            f"which exceeds the model's context of {limit} tokens. Fix: shorten the prompt or "
            "lower max_new_tokens in the suite."
        )


def describe_token(tokenizer: Any, token_id: int | None) -> str:
    """A token as a reviewer reads it in a failure: its text and its id."""
    if token_id is None:
        return "end of output"
    return f"{tokenizer.decode([token_id])!r} (id {token_id})"


def greedy_generate(model: Any, tokenizer: Any, input_ids: Any, attention_mask: Any, max_new_tokens: int,
                    **extra: Any) -> Any:
    """``generate`` with greedy decoding forced, whatever the model's generation_config says."""
    import torch

    with torch.inference_mode():
        return model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=tokenizer.pad_token_id,
            **extra,
        )
