"""``expect``: assertions on the decoded answer that survive a legitimate update.

A golden says "nothing changed"; an expectation says what must stay true when
something does (a new revision, a retrained adapter, another device): the
answer contains "Paris", starts with "Arr", parses as JSON matching a schema,
ends by itself within a token budget (where ``generate()`` stops: at an eos id of
the model's generation_config). Greedy by default; with ``sample:`` the prompt is
sampled ``n`` times from a fixed seed and the assertions must hold for at least
``min_pass_rate`` of the samples (sampling is what users run, and a rate
tolerates the odd bad draw where a single sample would be flaky). JSON Schema is
checked with the ``jsonschema`` package.

In reference mode (``--reference OLD``) a greedy expectation runs on OLD and NEW
and a failure says whether OLD held it. A sampled one draws the same seeded
samples from both: the same random stream makes sample ``i`` of OLD and of NEW a
pair, so a drop in NEW's pass rate is judged by an exact McNemar test on the
discordant pairs (one-sided: NEW worse), and the failure gives n, both rates
and the p-value.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from harness.checks.base import Check, CheckContext, CheckSpec, register_check
from harness.observe.prompts import (
    IF_NO_CHAT_TEMPLATE_HELP, MESSAGES_HELP, PROMPT_HELP, ChatMessages, PromptText, assert_fits_context,
    encode_or_skip, greedy_generate,
)
from harness.errors import CheckFailure

if TYPE_CHECKING:
    from harness.run.reference import ReferencePair

MIN_TEMPERATURE = 1e-3
ASSERTIONS = ("contains", "not_contains", "starts_with", "regex", "json", "max_tokens", "stops", "one_of")


class JsonExpectation(BaseModel):
    """``json: {schema: ...}``: the answer parses as JSON and matches the schema."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_: dict[str, Any] | None = Field(None, alias="schema", description=(
        "A JSON Schema the parsed answer must match; `$ref`s must point inside it (nothing is fetched)."))

    @field_validator("schema_")
    @classmethod
    def _valid_schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            import jsonschema

            try:
                jsonschema.validators.validator_for(value).check_schema(value)
            except jsonschema.SchemaError as exc:
                raise ValueError(f"not a valid JSON Schema: {exc.message}") from None
            problem = unresolvable_ref(value) or endless_ref(value)
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


# keywords whose subschemas apply to the same instance (a reference loop through them never ends)
_IN_PLACE_LISTS = ("allOf", "anyOf", "oneOf")
_IN_PLACE_ONE = ("not", "if", "then", "else")


def endless_ref(schema: dict[str, Any]) -> str | None:
    """Why validating against ``schema`` would never end, or None: a ``$ref`` that leads back to itself
    without descending into the instance (``{$ref: '#'}``, or two definitions referring to each other
    through ``allOf``). A reference under ``properties`` or ``items`` (a tree) descends, and is fine.
    """
    import jsonschema
    from referencing import Registry, Resource

    specification = jsonschema.validators.validator_for(schema).META_SCHEMA
    resource = Resource.from_contents(schema, default_specification=_specification(specification))
    root = resource.id() or "urn:harness:expect-schema"
    resolver = Registry().with_resource(root, resource).crawl().resolver(base_uri=root)
    state: dict[int, int] = {}  # id(node): 1 on the current path, 2 done

    def in_place(node: dict[str, Any], res: Any) -> list[tuple[Any, Any, str]]:
        out: list[tuple[Any, Any, str]] = []
        for key in ("$ref", "$dynamicRef"):
            if isinstance(node.get(key), str):
                found = res.lookup(node[key])
                out.append((found.contents, found.resolver, node[key]))
        for key in _IN_PLACE_LISTS:
            out += [(sub, res, "") for sub in node.get(key) or () if isinstance(node.get(key), list)]
        out += [(node[key], res, "") for key in _IN_PLACE_ONE if key in node]
        return [(sub, r, ref) for sub, r, ref in out if isinstance(sub, dict)]

    def loop_from(node: dict[str, Any], res: Any) -> str | None:
        if state.get(id(node)) == 1:
            return ""
        if state.get(id(node)) == 2:
            return None
        state[id(node)] = 1
        for sub, sub_res, ref in in_place(node, res):
            found = loop_from(sub, sub_res)
            if found is not None:
                return found or ref
        state[id(node)] = 2
        return None

    for node in _subschemas(schema):
        try:
            ref = loop_from(node, resolver)
        except Exception:  # noqa: BLE001 - unresolvable references are unresolvable_ref's to name
            continue
        if ref is not None:
            return (f"the schema refers to itself without end: following $ref {ref!r} leads back to the same "
                    "schema before any part of the answer is looked at, so validating an answer would never "
                    "finish. Fix: put the reference under properties or items (a tree of objects), or remove it")
    return None


def _subschemas(node: Any) -> list[dict[str, Any]]:
    """Every object in a schema that may be a subschema (data keywords left out)."""
    found: list[dict[str, Any]] = []
    if isinstance(node, dict):
        found.append(node)
        for key, value in node.items():
            if key not in ("enum", "const", "examples", "default"):
                found += _subschemas(value)
    elif isinstance(node, list):
        for value in node:
            found += _subschemas(value)
    return found


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

    contains: str | None = Field(None, description="The answer contains this text.")
    not_contains: str | None = Field(None, description="The answer does not contain this text.")
    starts_with: str | None = Field(None, description="The answer, leading whitespace stripped, starts with this.")
    regex: str | None = Field(None, description="A Python regular expression found in the answer (`re.search`).")
    json_: bool | JsonExpectation | None = Field(None, alias="json", description=(
        "`true`: the answer parses as JSON; `{schema: ...}`: and matches that JSON Schema."))
    max_tokens: int | None = Field(None, ge=1, description=(
        "The answer has at most this many tokens; below `max_new_tokens`, which would cut it there anyway."))
    stops: bool | None = Field(None, description=(
        "`true`: the answer ends by itself (an eos id of the model's generation config) within `max_new_tokens`."))
    one_of: list[str] | None = Field(None, min_length=1, description=(
        "The answer, stripped, is one of these texts."))

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
    """``sample:``: judge a pass rate over seeded samples instead of one greedy answer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n: int = Field(8, ge=1, le=256, description="Samples drawn.")
    seed: int = Field(0, description="Random seed of the first sample: the same seed draws the same samples.")
    # Below 0.001 sampling is greedy decoding in disguise, and near 1e-38 logits / temperature
    # overflows float32 to inf, so generate() fails on NaN probabilities.
    temperature: float = Field(0.7, ge=MIN_TEMPERATURE, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: keep the smallest set of tokens with this "
                                                       "much probability.")
    top_k: int | None = Field(None, ge=1, description="Keep only the k most likely tokens (default: all).")
    min_pass_rate: float = Field(0.75, gt=0, le=1, description="Fraction of the samples that must pass every "
                                                                "assertion.")
    # reference mode: NEW's pass rate is worse than OLD's when the paired test's p-value is below this
    alpha: float = Field(0.05, gt=0, lt=1, description=(
        "With `--reference OLD`: NEW's pass rate fails as worse than OLD's when a paired test's p-value is below "
        "this."))


class ExpectSpec(CheckSpec):
    """Assertions on the decoded answer that must survive a legitimate update (a new revision, a retrained
    adapter, another device): contains, starts with, matches, parses as JSON, stops in time. Greedy, or a pass
    rate over seeded samples."""

    kind: Literal["expect"]
    prompt: PromptText | None = Field(None, description=PROMPT_HELP)
    messages: ChatMessages | None = Field(None, description=MESSAGES_HELP)
    max_new_tokens: int = Field(32, ge=1, le=4096, description="Tokens to generate (fewer where the model stops).")
    expect: list[Assertion] = Field(min_length=1, description=(
        "Assertions, all of which must hold; each is a mapping with exactly one key (see the table below)."))
    ignore_case: bool = Field(False, description=(
        "Compare text (contains, not_contains, starts_with, regex, one_of) ignoring case."))
    sample: Sampling | None = Field(None, description="Sample instead of decoding greedily (see the table below).")
    if_no_chat_template: Literal["fail", "skip"] = Field("fail", description=IF_NO_CHAT_TEMPLATE_HELP)

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

    def answers(self, ctx: CheckContext) -> list[Answer]:
        """The greedy answer, or the seeded samples, of ``ctx``'s model."""
        __tracebackhide__ = True
        prompt_ids = encode_or_skip(ctx.tokenizer, model=ctx.pool.resolved, prompt=self.spec.prompt,
                                    messages=self.spec.messages, if_no_chat_template=self.spec.if_no_chat_template)
        model = ctx.model
        assert_fits_context(model, len(prompt_ids), self.spec.max_new_tokens, what=self.spec.id)
        return generate_answers(model, ctx.tokenizer, prompt_ids, self.spec)

    def run(self, ctx: CheckContext) -> None:
        __tracebackhide__ = True
        answers = self.answers(ctx)
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

    def run_against_reference(self, pair: ReferencePair) -> None:
        """Greedy: run on both (a failure says whether OLD held it). Sampled: the paired test."""
        __tracebackhide__ = True
        if self.spec.sample is None:
            super().run_against_reference(pair)
            return
        sampling = self.spec.sample
        old = [not self.failed(a) for a in self.answers(pair.on_old())]
        ctx = pair.on_new()
        answers = self.answers(ctx)
        new = [not self.failed(a) for a in answers]
        test = paired_drop(old, new)
        ctx.record(expect_samples=test.n, old_pass_rate=round(test.old_rate, 4), expect_pass_rate=round(test.new_rate, 4),
                   pairs_old_only=test.old_only, pairs_new_only=test.new_only, mcnemar_p=round(test.p_value, 6))
        sides = pair.sides
        figures = (f"n {test.n} samples (seed {sampling.seed}, temperature {sampling.temperature:g}, top_p "
                   f"{sampling.top_p:g}), the same seeds on both: pass rate {sides.expected_short} "
                   f"{test.old_rate:.2f}, {sides.actual_short} {test.new_rate:.2f}; {test.old_only} pair(s) pass on "
                   f"{sides.expected_short} only, {test.new_only} on {sides.actual_short} only; exact McNemar "
                   f"one-sided p = {test.p_value:.3g}")
        problems = []
        if test.p_value < sampling.alpha:
            problems.append(f"{sides.actual_short}'s pass rate is significantly lower than {sides.expected_short}'s "
                            f"(p {test.p_value:.3g} < alpha {sampling.alpha:g})")
        if test.new_rate < sampling.min_pass_rate:
            problems.append(f"{sides.actual_short}'s pass rate {test.new_rate:.2f} < min_pass_rate "
                            f"{sampling.min_pass_rate:g}" + (f" ({sides.expected_short}'s {test.old_rate:.2f} is "
                                                             "below it too)" if test.old_rate < sampling.min_pass_rate
                                                             else ""))
        if problems:
            shown = [(a, f) for a in answers if (f := self.failed(a))][:3]
            raise CheckFailure(
                f"{pair.label}: {self.spec.id}: " + "; ".join(problems) + f".\n{figures}.\nFailing samples of "
                f"{sides.actual_short}:\n" + "\n".join(f"  - {a.text!r}: {'; '.join(f)}" for a, f in shown)
                + "\nFix: the update made this expectation hold less often; if the new answers are still right, "
                "change the expectation."
            )


@dataclass(frozen=True)
class PairedTest:
    """Per-sample outcomes of OLD and NEW on the same seeds, and the exact McNemar test of a drop."""

    n: int
    old_rate: float
    new_rate: float
    old_only: int  # pairs that pass on OLD and fail on NEW
    new_only: int
    p_value: float  # one-sided: the chance of at least ``old_only`` of the discordant pairs if neither is worse


def paired_drop(old: list[bool], new: list[bool]) -> PairedTest:
    """Exact one-sided McNemar test on paired outcomes (True = the sample passes)."""
    from math import comb

    assert len(old) == len(new) and old, "paired outcomes of the same samples"
    old_only = sum(1 for o, n in zip(old, new) if o and not n)
    new_only = sum(1 for o, n in zip(old, new) if n and not o)
    discordant = old_only + new_only
    p = sum(comb(discordant, k) for k in range(old_only, discordant + 1)) / 2 ** discordant
    return PairedTest(n=len(old), old_rate=sum(old) / len(old), new_rate=sum(new) / len(new),
                      old_only=old_only, new_only=new_only, p_value=min(1.0, p))


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
    except RecursionError:
        return "is JSON nested deeper than Python reads (thousands of levels)"
    if isinstance(expected, JsonExpectation) and expected.schema_ is not None:
        import jsonschema

        try:
            errors = sorted(jsonschema.validators.validator_for(expected.schema_)(expected.schema_).iter_errors(value),
                            key=lambda e: list(e.path))
        except RecursionError:  # nested past Python's limit: the schema's references, or the answer itself
            return ("could not be checked against the JSON schema: validation nested deeper than Python allows "
                    "(a schema whose $ref loops, or an answer nested that deep)")
        if errors:
            where = "/".join(map(str, errors[0].path)) or "(root)"
            return f"does not match the JSON schema at {where}: {errors[0].message}"
    return None


def generate_answers(model: Any, tokenizer: Any, prompt_ids: list[int], spec: ExpectSpec) -> list[Answer]:
    """The greedy answer, or ``n`` samples from a fixed seed, decoded without special tokens."""
    import torch

    from harness.observe.observation import eos_ids

    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt_ids], device=device)
    mask = torch.ones_like(input_ids)
    if spec.sample is None:
        rows = greedy_generate(model, tokenizer, input_ids, mask, spec.max_new_tokens)
    else:
        rows = sample_rows(model, tokenizer, input_ids, spec.sample, spec.max_new_tokens)
    stop_ids = eos_ids(model)  # where generate() stops: the model's generation_config, not the tokenizer's eos
    answers: list[Answer] = []
    for row in rows[:, len(prompt_ids):].tolist():
        end = next((i for i, t in enumerate(row) if t in stop_ids), None)
        kept = row if end is None else row[:end]
        answers.append(Answer(tokenizer.decode(kept, skip_special_tokens=True), len(kept), end is not None))
    return answers


def sample_rows(model: Any, tokenizer: Any, input_ids: Any, s: Sampling, max_new_tokens: int) -> Any:
    """``s.n`` seeded samples of one prompt, as ``generate(num_return_sequences=n)`` draws them.

    The prompt is the same in every sample, so its prefill runs once and its KV cache is
    repeated ``n`` times (``generate`` would run the prompt ``n`` times over: 8 samples of a
    36-token chat prompt cost 4.5 s instead of 1.6 s on a 2-core CPU in fp16, 6.1 s instead of
    2.8 s in NF4). The random stream is the one ``generate`` draws from after the seed, so the
    samples are the same ones; only the batch shape of the prompt's matmuls differs, which
    rounds a few far-tail logits differently (measured: the same 8 samples, in both adapter
    variants of the embedded model). A cache that cannot be repeated (no
    ``batch_repeat_interleave``) or a one-token prompt takes ``generate``'s own path.
    """
    import torch

    settings = dict(max_new_tokens=max_new_tokens, do_sample=True, temperature=s.temperature, top_p=s.top_p,
                    top_k=s.top_k or 0, num_beams=1, pad_token_id=tokenizer.pad_token_id)
    mask = torch.ones_like(input_ids)
    with torch.inference_mode():
        cache = _prompt_cache(model, input_ids) if input_ids.shape[1] > 1 else {}
        torch.manual_seed(s.seed)
        if not cache:
            return model.generate(input_ids=input_ids, attention_mask=mask, num_return_sequences=s.n, **settings)
        next(iter(cache.values())).batch_repeat_interleave(s.n)
        return model.generate(input_ids=input_ids.repeat(s.n, 1), attention_mask=mask.repeat(s.n, 1),
                              **cache, **settings)


def _prompt_cache(model: Any, input_ids: Any) -> dict[str, Any]:
    """The KV cache of every prompt token but the last (``generate`` runs the last one itself), as
    the keyword ``generate`` takes it; empty where it cannot be repeated per sample."""
    from harness.observe.observation import cache_kwargs

    cache = cache_kwargs(model(input_ids=input_ids[:, :-1], use_cache=True))
    return cache if all(hasattr(c, "batch_repeat_interleave") for c in cache.values()) else {}
