"""``tokenization``: texts must survive encode → decode, and their token ids are a golden.

Runs once per model (the tokenizer does not depend on the variant). Two things
are checked: round-trips, which catch a lossy tokenizer (unknown characters,
normalization, whitespace collapsing), and the ids themselves, which catch a
tokenizer swapped or edited in a way that still round-trips but shifts ids,
so that the weights no longer mean what they meant.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from harness.checks.base import Check, CheckContext, CheckSpec, register_check
from harness.errors import CheckFailure

# Each covers a way tokenizers go wrong: byte fallback (CJK, emoji with ZWJ
# sequences, skin tones and flags), whitespace handling (code, tabs, runs,
# CRLF), several scripts at once, text that looks like another model's special
# tokens, and the empty string.
DEFAULT_TEXTS: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "我爱自然语言处理。今天天气很好！",
    "Family 👨\u200d👩\u200d👧\u200d👦, flags 🇫🇷🇯🇵, thumbs 👍🏽, heart ❤️",
    "def add(a, b):\n    if a:\n\treturn a + b  # tab\n    return b\n",
    "a  b   c\n\n\nd \t e\r\n    \n",
    "مرحبا بالعالم, नमस्ते दुनिया, Привет, мир, こんにちは世界",
    "Pi is 3.14159, a million is 1,000,000 and today is 2024-01-31.",
    "<|im_start|>user\nhi<|im_end|>",
    "</s><s>",
    "[INST] Hello [/INST]",
    "",
)

RoundTrip = Literal["exact", "strip", "none"]


class TokenizationSpec(CheckSpec):
    """Texts must survive encode then decode, and their token ids are a golden (once per model), so a tokenizer
    that still round-trips but shifts ids fails."""

    kind: Literal["tokenization"]
    texts: list[str] | None = Field(None, min_length=1, description=(
        "Distinct texts to check (default: built-in ones: several scripts, emoji, code and whitespace runs, numbers, "
        "special-token look-alikes, the empty text)."))
    special_tokens: bool = Field(True, description=(
        "Also encode with the tokenizer's special tokens added (recorded where the ids differ) and check that "
        "decoding with `skip_special_tokens` gives the text back."))
    roundtrip: RoundTrip = Field("exact", description=(
        "How strictly decode(encode(text)) must equal the text: `exact`, byte for byte (byte-level BPE "
        "tokenizers); `strip`, up to leading/trailing whitespace (SentencePiece tokenizers that add or drop a "
        "prefix space); `none`, not checked (tokenizers that normalize: lowercase, NFKC, collapsed whitespace; "
        "the ids golden still catches changes)."))

    @field_validator("texts")
    @classmethod
    def _distinct(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError("texts must be distinct (each names its entry in the golden)")
        return value


@register_check("tokenization")
class TokenizationCheck(Check[TokenizationSpec]):
    Spec = TokenizationSpec
    uses_goldens = True
    per_variant = False

    @property
    def texts(self) -> list[str]:
        return list(self.spec.texts) if self.spec.texts is not None else list(DEFAULT_TEXTS)

    def run(self, ctx: CheckContext) -> None:
        __tracebackhide__ = True
        tokenizer = ctx.tokenizer
        special_ids = special_token_ids(tokenizer)
        entries: list[dict[str, Any]] = []
        bad: list[str] = []
        bad_texts: set[str] = set()
        for text in self.texts:
            ids = list(tokenizer.encode(text, add_special_tokens=False))
            decoded = tokenizer.decode(ids, skip_special_tokens=False)
            if not _same(text, decoded, self.spec.roundtrip):
                bad.append(f"{_short(text)}: decode(encode(text)) gave {_short(decoded)}")
                bad_texts.add(text)
            entry: dict[str, Any] = {
                "text": text,
                "ids": ids,
                "tokens": list(tokenizer.convert_ids_to_tokens(ids)),
            }
            if self.spec.special_tokens:
                with_special = list(tokenizer(text, add_special_tokens=True)["input_ids"])
                if with_special != ids:
                    entry["ids_with_special_tokens"] = with_special
                # special-looking text parsed as special tokens is dropped by skip_special_tokens
                want = tokenizer.decode([i for i in ids if i not in special_ids], skip_special_tokens=False)
                got = tokenizer.decode(with_special, skip_special_tokens=True)
                if not _same(want, got, self.spec.roundtrip):
                    bad.append(
                        f"{_short(text)}: decode(encode(text, add_special_tokens=True), "
                        f"skip_special_tokens=True) gave {_short(got)}, expected {_short(want)}"
                    )
                    bad_texts.add(text)
            entries.append(entry)
        if bad:
            raise CheckFailure(
                f"{self.spec.id}: {len(bad_texts)} text{'s do' if len(bad_texts) > 1 else ' does'} not round-trip "
                f"through the tokenizer (roundtrip: {self.spec.roundtrip}):\n"
                + "\n".join(f"  - {line}" for line in bad)
                + "\nThe tokenizer loses information (unknown characters, normalization or whitespace "
                "handling). If this tokenizer normalizes by design, set `roundtrip: strip` or "
                "`roundtrip: none` on the check."
            )
        actual = {"special_tokens": special_token_table(tokenizer), "texts": entries}
        ctx.assert_golden(actual, explain_tokenization)


def special_token_ids(tokenizer: Any) -> set[int]:
    """Ids that ``skip_special_tokens`` drops: the named specials and added tokens marked special."""
    ids = set(tokenizer.all_special_ids)
    for token_id, token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(token, "special", False):
            ids.add(int(token_id))
    return ids


def special_token_table(tokenizer: Any) -> dict[str, Any]:
    """The named special tokens and their ids: a changed BOS or EOS id changes every prompt."""
    table: dict[str, Any] = {}
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        token = getattr(tokenizer, name, None)
        table[name] = None if token is None else {"token": str(token), "id": tokenizer.convert_tokens_to_ids(str(token))}
    return table


def _same(want: str, got: str, mode: RoundTrip) -> bool:
    if mode == "none":
        return True
    if mode == "strip":
        return want.strip() == got.strip()
    return want == got


def _short(text: str, limit: int = 80) -> str:
    shown = repr(text)
    return shown if len(shown) <= limit else shown[: limit - 4] + "...'"


def explain_tokenization(expected: dict[str, Any], actual: dict[str, Any]) -> str:
    """Per text: which text, the first differing index, expected vs actual id and token."""
    lines: list[str] = []
    exp_special, act_special = expected.get("special_tokens") or {}, actual.get("special_tokens") or {}
    for name in sorted(set(exp_special) | set(act_special)):
        if exp_special.get(name) != act_special.get(name):
            lines.append(f"special token {name}: expected {exp_special.get(name)}, got {act_special.get(name)}")
    exp_by_text = {e["text"]: e for e in expected.get("texts", [])}
    act_by_text = {e["text"]: e for e in actual.get("texts", [])}
    changed = 0
    for text, act in act_by_text.items():
        exp = exp_by_text.get(text)
        if exp is None:
            lines.append(f"text {_short(text)} is not in the golden (the suite's texts changed)")
            continue
        for field in ("ids", "ids_with_special_tokens"):
            diff = _first_difference(exp.get(field), act.get(field))
            if diff is None:
                continue
            changed += 1
            index, want, got = diff
            tokens = "" if field != "ids" else (
                f", tokens {_at(exp.get('tokens'), index)!r} -> {_at(act.get('tokens'), index)!r}"
            )
            lines.append(
                f"text {_short(text)}: {field} differ first at index {index}: expected id {want}, "
                f"got {got}{tokens} (length {len(exp.get(field) or [])} -> {len(act.get(field) or [])})"
            )
        if exp.get("ids") == act.get("ids") and exp.get("tokens") != act.get("tokens"):
            changed += 1
            diff = _first_difference(exp.get("tokens"), act.get("tokens"))
            assert diff is not None
            lines.append(
                f"text {_short(text)}: same ids, but token strings differ first at index {diff[0]}: "
                f"{diff[1]!r} -> {diff[2]!r} (the vocabulary was re-mapped)"
            )
    for text in exp_by_text:
        if text not in act_by_text:
            lines.append(f"golden text {_short(text)} is no longer checked (the suite's texts changed)")
    if changed:
        lines.insert(0, f"tokenization changed for {changed} of {len(act_by_text)} texts "
                        "(the same text now reaches the model as other ids or tokens):")
    return "\n".join(lines) or "the observation differs from the golden"


def _at(values: list[Any] | None, index: int) -> Any:
    return values[index] if values is not None and index < len(values) else "(end)"


def _first_difference(want: list[Any] | None, got: list[Any] | None) -> tuple[int, Any, Any] | None:
    if want == got:
        return None
    want, got = want or [], got or []
    for index, (a, b) in enumerate(zip(want, got)):
        if a != b:
            return index, a, b
    index = min(len(want), len(got))
    return index, _at(want, index), _at(got, index)
