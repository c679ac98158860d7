"""``expect``: assertions on the decoded answer that survive a legitimate update.

A golden says "nothing changed"; an expectation says what must stay true when
something does (a new revision, a retrained adapter, another device): the
answer contains "Paris", starts with "Arr", parses as JSON matching a schema,
ends by itself within a token budget. Greedy by default; with ``sample:`` the
prompt is sampled ``n`` times from a fixed seed and the assertions must hold
for at least ``min_pass_rate`` of the samples (sampling is what users run, and
a rate tolerates the odd bad draw where a single sample would be flaky).
JSON Schema is checked with the ``jsonschema`` package.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from harness.checks.base import Check, CheckContext, CheckSpec, register_check
from harness.checks.prompts import ChatMessages, PromptText, assert_fits_context, encode_or_skip, greedy_generate
from harness.errors import CheckFailure

MIN_TEMPERATURE = 1e-3
ASSERTIONS = ("contains", "not_contains", "starts_with", "regex", "json", "max_tokens", "stops", "one_of")


class JsonExpectation(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_: dict[str, Any] | None = Field(None, alias="schema")

    @field_validator("schema_")
    @classmethod
    def _valid_schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            import jsonschema

            try:
                jsonschema.validators.validator_for(value).check_schema(value)
            except jsonschema.SchemaError as exc:
                raise ValueError(f"not a valid JSON Schema: {exc.message}") from None
            problem = unresolvable_ref(value)
            if problem:
                raise ValueError(problem)
        return value


def unresolvable_ref(schema: dict[str, Any]) -> str | None:
    """Why a ``$ref`` of ``schema`` cannot be resolved inside it, or None.

    ``check_schema`` accepts a reference to a definition that does not exist; validating an
    answer would then raise inside the check. Nothing is fetched: a reference outside the
    schema (another file, a URL) is refused the same way.
    """
    import jsonschema
    from referencing import Registry, Resource
    from referencing.exceptions import Unresolvable

    specification = jsonschema.validators.validator_for(schema).META_SCHEMA
    resource = Resource.from_contents(schema, default_specification=_specification(specification))
    root = resource.id() or "urn:harness:expect-schema"
    registry = Registry().with_resource(root, resource).crawl()
    for base, ref in _refs(schema, root):
        try:
            registry.resolver(base_uri=base).lookup(ref)
        except Unresolvable as exc:
            detail = str(exc) if len(str(exc)) <= 120 else str(exc)[:117] + "..."
            return (f"the schema's $ref {ref!r} does not resolve ({type(exc).__name__}: {detail}); references must "
                    "point inside the schema (e.g. '#/$defs/NAME' with that definition under $defs), since "
                    "nothing is fetched")
    return None


def _specification(meta_schema: dict[str, Any]) -> Any:
    from referencing.jsonschema import DRAFT202012, specification_with

    return specification_with(str(meta_schema.get("$schema", "")), default=DRAFT202012)


def _refs(node: Any, base: str) -> list[tuple[str, str]]:
    """(base URI, reference) of every ``$ref`` and ``$dynamicRef`` below ``node``, following ``$id``."""
    from urllib.parse import urljoin

    found: list[tuple[str, str]] = []
    if isinstance(node, dict):
        if isinstance(node.get("$id"), str):
            base = urljoin(base, node["$id"])
        for key, value in node.items():
            if key in ("$ref", "$dynamicRef") and isinstance(value, str):
                found.append((base, value))
            elif key not in ("enum", "const", "examples", "default"):  # data, not subschemas
                found += _refs(value, base)
    elif isinstance(node, list):
        for value in node:
            found += _refs(value, base)
    return found


class Assertion(BaseModel):
    """Exactly one of the assertion keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    contains: str | None = None
    not_contains: str | None = None
    starts_with: str | None = None
    regex: str | None = None
    json_: bool | JsonExpectation | None = Field(None, alias="json")
    max_tokens: int | None = Field(None, ge=1)
    stops: bool | None = None
    one_of: list[str] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _exactly_one(self) -> Assertion:
        given = [name for name in ASSERTIONS if getattr(self, _attr(name)) is not None]
        if len(given) != 1:
            raise ValueError(f"each expectation is one of {', '.join(ASSERTIONS)} "
                             f"({'none' if not given else ', '.join(given)} given)")
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as exc:
                raise ValueError(f"regex {self.regex!r} does not compile: {exc}") from None
        if self.json_ is False or self.stops is False:
            raise ValueError("json and stops take `true` (or, for json, {schema: ...}); leave them out otherwise")
        problem = self._cannot_fail_or_pass()
        if problem:
            raise ValueError(problem)
        return self

    def _cannot_fail_or_pass(self) -> str | None:
        """An assertion whose verdict does not depend on the answer judges nothing."""
        if self.contains == "" or self.starts_with == "":
            return (f"{self.name} \"\" is true of every answer, so it can never fail; "
                    "write the text the answer must have")
        if self.not_contains == "":
            return "not_contains \"\" is false of every answer (each contains the empty text), so it always fails"
        if self.starts_with is not None and not self.starts_with.strip():
            return ("starts_with is only whitespace, and answers are compared after their leading whitespace "
                    "is stripped, so it can never pass; write the first visible text")
        if self.regex is not None and all(re.search(self.regex, probe) for probe in _REGEX_PROBES):
            return (f"regex {self.regex!r} matches the empty text and every sample answer, so it matches any "
                    "answer and can never fail; anchor it or require at least one character")
        return None

    @property
    def name(self) -> str:
        return next(n for n in ASSERTIONS if getattr(self, _attr(n)) is not None)

    def describe(self) -> str:
        value = getattr(self, _attr(self.name))
        if isinstance(value, JsonExpectation):
            return "json (matching the schema)" if value.schema_ is not None else "json"
        return self.name if value is True else f"{self.name} {value!r}"


# Texts a regex that "matches anything" matches: the empty text and unrelated answers.
_REGEX_PROBES = ("", "\n", "0", "zq", "The capital of France is Paris.", '{"a": 1}', "  \t")


def _attr(name: str) -> str:
    return "json_" if name == "json" else name


class Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    n: int = Field(8, ge=1, le=256)
    seed: int = 0
    # Below 0.001 sampling is greedy decoding in disguise, and near 1e-38 logits / temperature
    # overflows float32 to inf, so generate() fails on NaN probabilities.
    temperature: float = Field(0.7, ge=MIN_TEMPERATURE)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    min_pass_rate: float = Field(0.75, gt=0, le=1)


class ExpectSpec(CheckSpec):
    kind: Literal["expect"]
    prompt: PromptText | None = None
    messages: ChatMessages | None = None
    max_new_tokens: int = Field(32, ge=1, le=4096)
    expect: list[Assertion] = Field(min_length=1)
    ignore_case: bool = False
    sample: Sampling | None = None
    if_no_chat_template: Literal["fail", "skip"] = "fail"

    @model_validator(mode="after")
    def _one_prompt(self) -> ExpectSpec:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' (raw text) or 'messages' (chat)")
        for index, assertion in enumerate(self.expect):
            if assertion.max_tokens is not None and assertion.max_tokens >= self.max_new_tokens:
                raise ValueError(
                    f"expect[{index}]: max_tokens {assertion.max_tokens} can never fail, since generation stops at "
                    f"max_new_tokens {self.max_new_tokens}; lower max_tokens or raise max_new_tokens above it")
        return self


@dataclass(frozen=True)
class Answer:
    text: str
    new_tokens: int
    stopped: bool


@register_check("expect")
class ExpectCheck(Check[ExpectSpec]):
    Spec = ExpectSpec

    def run(self, ctx: CheckContext) -> None:
        __tracebackhide__ = True
        prompt_ids = encode_or_skip(ctx.tokenizer, model_name=ctx.pool.resolved.name, prompt=self.spec.prompt,
                                    messages=self.spec.messages, if_no_chat_template=self.spec.if_no_chat_template)
        model = ctx.model
        assert_fits_context(model, len(prompt_ids), self.spec.max_new_tokens, what=self.spec.id)
        answers = generate_answers(model, ctx.tokenizer, prompt_ids, self.spec)
        failures = [(a, self.failed(a)) for a in answers]
        passed = sum(1 for _, f in failures if not f)
        ctx.record(expect_pass_rate=passed / len(answers), expect_samples=len(answers))
        if self.spec.sample is None:
            answer, failed = failures[0]
            if failed:
                raise CheckFailure(
                    f"{self.spec.id}: the greedy answer {answer.text!r} ({answer.new_tokens} tokens, "
                    f"{'ended by eos' if answer.stopped else 'cut at max_new_tokens'}) fails:\n"
                    + "\n".join(f"  - {f}" for f in failed)
                    + "\nIf the new answer is right, change the expectation in the suite; expectations are "
                    "not goldens and are never re-recorded."
                )
            return
        sampling = self.spec.sample
        rate = passed / len(answers)
        if rate < sampling.min_pass_rate:
            shown = [(a, f) for a, f in failures if f][:3]
            raise CheckFailure(
                f"{self.spec.id}: {passed} of {len(answers)} samples (seed {sampling.seed}, temperature "
                f"{sampling.temperature:g}, top_p {sampling.top_p:g}) pass, a rate of {rate:.2f} < "
                f"min_pass_rate {sampling.min_pass_rate:g}. Failing samples:\n"
                + "\n".join(f"  - {a.text!r}: {'; '.join(f)}" for a, f in shown)
                + "\nFix: the model's answers changed; if they are still right, change the expectation."
            )

    def failed(self, answer: Answer) -> list[str]:
        """Each assertion the answer breaks, with what the answer has instead."""
        return [reason for a in self.spec.expect if (reason := judge(a, answer, self.spec.ignore_case))]


def judge(assertion: Assertion, answer: Answer, ignore_case: bool) -> str | None:
    """Why ``answer`` breaks ``assertion``, or None."""
    fold = (lambda s: s.casefold()) if ignore_case else (lambda s: s)
    text = fold(answer.text)
    name = assertion.name
    if name == "contains" and fold(assertion.contains or "") not in text:
        return f"does not contain {assertion.contains!r}"
    if name == "not_contains" and fold(assertion.not_contains or "") in text:
        at = text.index(fold(assertion.not_contains or ""))
        return f"contains {assertion.not_contains!r} (at character {at})"
    if name == "starts_with" and not text.lstrip().startswith(fold(assertion.starts_with or "")):
        return f"does not start with {assertion.starts_with!r}; it starts with {answer.text.lstrip()[:20]!r}"
    if name == "regex" and not re.search(assertion.regex or "", answer.text, re.IGNORECASE if ignore_case else 0):
        return f"has no match for regex {assertion.regex!r}"
    if name == "one_of" and text.strip() not in {fold(o).strip() for o in assertion.one_of or []}:
        return f"is not one of {assertion.one_of!r}"
    if name == "max_tokens" and answer.new_tokens > (assertion.max_tokens or 0):
        return f"has {answer.new_tokens} tokens > max_tokens {assertion.max_tokens}"
    if name == "stops" and not answer.stopped:
        return f"does not end by itself: no eos within max_new_tokens ({answer.new_tokens} tokens)"
    if name == "json":
        return _json_problem(assertion.json_, answer.text)
    return None


def _json_problem(expected: Any, text: str) -> str | None:
    try:
        value = json.loads(text.strip())
    except json.JSONDecodeError as exc:
        return f"is not JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
    if isinstance(expected, JsonExpectation) and expected.schema_ is not None:
        import jsonschema

        errors = sorted(jsonschema.validators.validator_for(expected.schema_)(expected.schema_).iter_errors(value),
                        key=lambda e: list(e.path))
        if errors:
            where = "/".join(map(str, errors[0].path)) or "(root)"
            return f"does not match the JSON schema at {where}: {errors[0].message}"
    return None


def generate_answers(model: Any, tokenizer: Any, prompt_ids: list[int], spec: ExpectSpec) -> list[Answer]:
    """The greedy answer, or ``n`` samples from a fixed seed, decoded without special tokens."""
    import torch

    from harness.observation import eos_ids

    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt_ids], device=device)
    mask = torch.ones_like(input_ids)
    if spec.sample is None:
        rows = greedy_generate(model, tokenizer, input_ids, mask, spec.max_new_tokens)
    else:
        s = spec.sample
        torch.manual_seed(s.seed)
        with torch.inference_mode():
            rows = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=spec.max_new_tokens,
                                  do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k or 0,
                                  num_beams=1, num_return_sequences=s.n, pad_token_id=tokenizer.pad_token_id)
    stop_ids = eos_ids(model) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
    answers: list[Answer] = []
    for row in rows[:, len(prompt_ids):].tolist():
        end = next((i for i, t in enumerate(row) if t in stop_ids), None)
        kept = row if end is None else row[:end]
        answers.append(Answer(tokenizer.decode(kept, skip_special_tokens=True), len(kept), end is not None))
    return answers
