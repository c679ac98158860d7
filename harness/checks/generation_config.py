"""``generation_config``: the generation settings a user's ``generate()`` gets are a golden.

Runs once per model (an adapter does not carry a generation config): eos, pad
and bos ids (with their tokens), sampling defaults, penalties, lengths and
stop strings, resolved the way ``generate`` resolves them
(``harness.models.generation_settings``). A model update that edits
``generation_config.json`` changes what every user gets without changing a
weight or a greedy golden made with forced greedy decoding; the diff names
each changed setting.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import Field, field_validator

from harness.checks.base import Check, CheckContext, CheckSpec, register_check
from harness.judge.compare import GOLDEN_SIDES, Sides
from harness.models.generation_settings import SETTINGS, effective_generation_settings, load_generation_config

TOKEN_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id",
                "forced_bos_token_id", "forced_eos_token_id")


class GenerationConfigSpec(CheckSpec):
    """The generation settings a user's `generate()` gets (eos/pad/bos ids, sampling defaults, penalties,
    lengths, stop strings) are a golden, once per model: an edited generation_config.json fails by name."""

    kind: Literal["generation_config"]
    ignore: list[str] = Field(default_factory=list, description="Settings left out of the golden (by name, e.g. "
                                                                "`max_length`).")

    @field_validator("ignore")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        import difflib

        for name in value:
            if name not in SETTINGS:
                match = difflib.get_close_matches(name, SETTINGS, n=1)
                raise ValueError(f"unknown setting {name!r}" + (f"; did you mean {match[0]!r}?" if match else ""))
        return value


@register_check("generation_config")
class GenerationConfigCheck(Check[GenerationConfigSpec]):
    Spec = GenerationConfigSpec
    uses_goldens = True
    per_variant = False

    def run(self, ctx: CheckContext) -> None:
        __tracebackhide__ = True
        resolved = ctx.pool.resolved
        config = load_generation_config(resolved.path, trust_remote_code=resolved.entry.trust_remote_code)
        settings = {k: as_list(k, v) for k, v in effective_generation_settings(config).items()
                    if k not in self.spec.ignore}
        actual = {"settings": settings, "tokens": token_texts(ctx.tokenizer, settings)}
        ctx.assert_golden(actual, lambda exp, act: explain_settings(exp, act, ctx.sides))


def as_list(name: str, value: Any) -> Any:
    """eos ids and stop strings (one or several) always as lists: ``2`` -> ``[2, 0]`` is a changed setting."""
    if name in ("eos_token_id", "stop_strings") and value is not None and not isinstance(value, list):
        return [value]
    return value


def token_texts(tokenizer: Any, settings: dict[str, Any]) -> dict[str, Any]:
    """The special tokens behind the ids, for the reviewer (an id alone hides a swapped token)."""
    texts: dict[str, Any] = {}
    for name in TOKEN_FIELDS:
        value = settings.get(name)
        if value is None:
            continue
        ids = value if isinstance(value, list) else [value]
        texts[name] = [tokenizer.convert_ids_to_tokens(int(i)) for i in ids]
    return texts


def explain_settings(expected: dict[str, Any], actual: dict[str, Any], sides: Sides = GOLDEN_SIDES) -> str:
    """One line per changed setting: name, golden (or OLD's) value, current (NEW's) value."""
    now = "now" if sides == GOLDEN_SIDES else sides.actual_short
    lines: list[str] = []
    for section in ("settings", "tokens"):
        exp, act = expected.get(section, {}), actual.get(section, {})
        for name in _ordered([*exp, *(k for k in act if k not in exp)]):
            if exp.get(name, "<absent>") == act.get(name, "<absent>"):
                continue
            label = name if section == "settings" else f"{name} (as tokens)"
            lines.append(f"  {label}: {sides.expected_short} {_show(exp, name)}, {now} {_show(act, name)}")
    head = (f"the effective generation settings changed ({len(lines)} setting{'s' if len(lines) != 1 else ''}); "
            "every user's generate() output can change with them:")
    return "\n".join([head, *lines]) if lines else "the generation settings golden differs in its layout"


def _ordered(names: list[str]) -> list[str]:
    """Settings in the order generate() users think of them (ids, strategy, sampling...), then the rest."""
    rank = {name: index for index, name in enumerate(SETTINGS)}
    return sorted(names, key=lambda n: (rank.get(n, len(rank)), n))


def _show(values: dict[str, Any], name: str) -> str:
    return json.dumps(values[name], ensure_ascii=False) if name in values else "(not set)"
