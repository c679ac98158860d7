"""The assertion language of ``expect``: what a suite may assert of an answer, and how each is judged.

One key per assertion (contains, not_contains, starts_with, regex, json, max_tokens, stops,
one_of), validated when the suite loads so that an assertion that cannot fail, or a JSON
Schema that cannot be used (a ``$ref`` that does not resolve, or that loops without end),
is refused there rather than inside a run. Kept apart from the check (``expect.py``),
which only generates answers and reports.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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


@dataclass(frozen=True)
class Answer:
    """What an assertion judges: the decoded text, its length, and whether the model ended it itself."""

    text: str
    new_tokens: int
    stopped: bool


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
