"""A suite file, validated: its name, shared defaults and checks, each with its YAML line.

Every problem becomes a SuiteError naming the file, the line and the key, so
that pytest reports it as a collection error of this file only.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.checks import Check, get_check, known_kinds
from harness.errors import SuiteError
from harness.suites.names import MAX_NAME_LENGTH, name_problem, safe_name
from harness.judge.tolerance import ToleranceSpec
from harness.suites.validation import validate
from harness.models.variants import ALL_KEYS
from harness.suites.yamlload import YamlList, YamlMap, load_yaml

# The top-level keys of a suite file, with what each means (the suite reference and schema print these).
SUITE_KEYS: dict[str, str] = {
    "suite": "The suite's name (default: the file's name without .yaml). It names the suite's golden folder, so "
             "ASCII letters, digits, '-', '_' and '.' only, unique among the suites of a run.",
    "description": "What the suite is for, in words.",
    "defaults": "Values for keys of the checks below, where a check does not set them itself; each applies to "
                "the kinds that have that key. `tolerance` here layers under each check's own, field by field. "
                "Not `id` or `kind`.",
    "variants": "Run every check of the suite only in these variants (a check's own `variants:` wins).",
    "checks": "The checks, a non-empty list; each is a mapping with at least `id` and `kind`.",
}


@dataclass(frozen=True)
class CheckEntry:
    check: Check[Any]
    line: int


@dataclass(frozen=True)
class SuiteSpec:
    name: str
    path: Path
    description: str
    checks: list[CheckEntry]


def load_suite(path: Path) -> SuiteSpec:
    data = load_yaml(path, what="suite")
    if not isinstance(data, YamlMap):
        raise SuiteError(
            path, f"a suite is a mapping with 'checks', but this file holds a {type(data).__name__}",
            line=getattr(data, "line", 1),
            hint="start the file with `suite: NAME` and `checks:` followed by a list of checks",
        )
    for key in data:
        if key not in SUITE_KEYS:
            match = difflib.get_close_matches(key, sorted(SUITE_KEYS), n=1)
            raise SuiteError(path, "unknown key", line=data.lines[key], key=key,
                             hint=f"did you mean {match[0]!r}?" if match else
                             f"allowed top-level keys: {', '.join(sorted(SUITE_KEYS))}")
    name = _suite_name(path, data)
    checks = data.get("checks")
    if not isinstance(checks, YamlList) or not checks:
        raise SuiteError(path, "'checks' must be a non-empty list", line=data.lines.get("checks", 1),
                         key="checks", hint="add at least one check with an id and a kind")
    defaults = data.get("defaults", YamlMap())
    if not isinstance(defaults, YamlMap):
        raise SuiteError(path, "'defaults' must be a mapping", line=data.lines.get("defaults"), key="defaults")
    _check_defaults_used(path, defaults)
    suite_tolerance = _suite_tolerance(path, defaults)
    suite_variants = _suite_variants(path, data)
    entries: list[CheckEntry] = []
    seen: dict[str, tuple[str, int]] = {}
    for index, raw in enumerate(checks):
        line = checks.lines[index]
        entry = _check_entry(path, index, raw, line, defaults, suite_variants, suite_tolerance)
        check_id = entry.check.spec.id
        if check_id.casefold() in seen:  # macOS and Windows file systems ignore case: one golden file
            first, first_line = seen[check_id.casefold()]
            same = "" if first == check_id else f" ({first!r} differs only by case: one golden file where case is ignored)"
            raise SuiteError(path, f"duplicate check id {check_id!r} (first at line {first_line}){same}",
                             line=line, key=f"checks[{index}].id",
                             hint="give every check its own id: it names the test and its golden file")
        seen[check_id.casefold()] = (check_id, line)
        entries.append(entry)
    return SuiteSpec(name=name, path=path, description=str(data.get("description", "")), checks=entries)


def _suite_name(path: Path, data: YamlMap) -> str:
    """The suite's name (``suite:``, else the file's stem): it names a golden folder, so the golden-name rule applies."""
    name = data.get("suite", path.stem)
    if not isinstance(name, str):
        raise SuiteError(path, f"the suite name must be text, but YAML read {name!r} as something else",
                         line=data.lines.get("suite"), key="suite", hint="quote it")
    problem = name_problem(name)
    if problem:
        suggestion = safe_name(str(name), fallback="my-suite")[:MAX_NAME_LENGTH]
        hint = (f"rename it in `suite:`, e.g. `suite: {suggestion}`" if "suite" in data else
                f"the name comes from the file name: rename the file, or set `suite: {suggestion}`")
        given = f"you wrote {name!r}" if "suite" in data else f"the suite is named after its file: {name!r}"
        raise SuiteError(path, f"{problem} ({given})", line=data.lines.get("suite"), key="suite", hint=hint)
    return name


def _suite_variants(path: Path, data: YamlMap) -> list[str] | None:
    value = data.get("variants")
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) and v in ALL_KEYS for v in value):
        raise SuiteError(path, f"'variants' must be a list out of {', '.join(ALL_KEYS)}",
                         line=data.lines["variants"], key="variants")
    if not value:
        raise SuiteError(path, "an empty list selects no variant, so no per-variant check of this suite would run",
                         line=data.lines["variants"], key="variants",
                         hint="remove the key (all variants) or list variants")
    return list(value)


def _suite_tolerance(path: Path, defaults: YamlMap) -> ToleranceSpec | None:
    """``defaults: tolerance:``, validated once: it layers under each check's own, field by field."""
    if "tolerance" not in defaults:
        return None
    try:
        return validate(ToleranceSpec, defaults["tolerance"], path=path, root=defaults, loc=("tolerance",))
    except SuiteError as err:
        raise dataclasses.replace(err, key=f"defaults.{err.key}" if err.key else "defaults.tolerance") from None


def _check_entry(path: Path, index: int, raw: Any, line: int, defaults: YamlMap,
                 suite_variants: list[str] | None, suite_tolerance: ToleranceSpec | None = None) -> CheckEntry:
    if not isinstance(raw, YamlMap):
        raise SuiteError(path, "each check is a mapping with at least 'id' and 'kind'", line=line,
                         key=f"checks[{index}]")
    kind = raw.get("kind")
    if not isinstance(kind, str):
        raise SuiteError(path, "required field is missing" if kind is None else "kind must be text",
                         line=raw.lines.get("kind", line), key=f"checks[{index}].kind",
                         hint=f"known kinds: {', '.join(known_kinds())}")
    try:
        cls = get_check(kind)
    except KeyError as exc:
        raise SuiteError(path, f"unknown check kind {kind!r}", line=raw.lines["kind"],
                         key=f"checks[{index}].kind", hint=str(exc.args[0])) from None
    fields = cls.Spec.model_fields
    merged = YamlMap({k: v for k, v in defaults.items() if k in fields and k not in raw and k != "tolerance"})
    merged.update(raw)
    merged.line, merged.lines, merged.raw = raw.line, {**defaults.lines, **raw.lines}, {**defaults.raw, **raw.raw}
    if suite_variants is not None and "variants" not in raw:
        merged["variants"] = suite_variants
    try:
        spec = validate(cls.Spec, merged, path=path, root=merged)
    except SuiteError as err:
        key = f"checks[{index}]" + (f".{err.key}" if err.key else "")
        raise dataclasses.replace(err, key=key, line=err.line or line) from None
    _check_effective(path, index, raw, cls, spec)
    if "tolerance" in fields and suite_tolerance is not None:
        spec._suite_tolerance = suite_tolerance
        check_line = raw.lines.get("tolerance")
        spec._tolerance_places = (f"the suite's defaults ({path.name}:{defaults.lines.get('tolerance')})",
                                  f"the check ({path.name}:{check_line})" if check_line else "the check")
    elif "tolerance" in fields and raw.lines.get("tolerance"):
        spec._tolerance_places = ("the suite's defaults", f"the check ({path.name}:{raw.lines['tolerance']})")
    return CheckEntry(check=cls(spec), line=line)


def _check_effective(path: Path, index: int, raw: YamlMap, cls: type[Check[Any]], spec: Any) -> None:
    """What the check itself says must take effect: a key it sets that changes nothing, or a variant it
    lists that its kind can never judge, is a suite error (a value from ``defaults:`` is not: defaults
    serve every kind, and apply where they mean something)."""
    for name, why in spec.ignored().items():
        if name in raw:
            raise SuiteError(path, f"has no effect: {why}", line=raw.lines.get(name), key=f"checks[{index}].{name}")
    own = raw.get("variants")
    for key in own if isinstance(own, list) else []:
        why = cls.unjudgeable(key)
        if why:
            raise SuiteError(path, f"{spec.kind} can never judge variant {key!r}: {why}", line=raw.lines["variants"],
                             key=f"checks[{index}].variants",
                             hint="list only variants this kind judges, or remove `variants:` for its default")


def _check_defaults_used(path: Path, defaults: YamlMap) -> None:
    every_field = {f for kind in known_kinds() for f in get_check(kind).Spec.model_fields}
    for key in defaults:
        if key in ("id", "kind"):
            raise SuiteError(path, f"`{key}` belongs to each check, not to defaults (every check needs its own)",
                             line=defaults.lines[key], key=f"defaults.{key}",
                             hint=f"remove it from defaults and give each check its `{key}:`")
        if key not in every_field:
            match = difflib.get_close_matches(key, sorted(every_field - {"id", "kind"}), n=1)
            raise SuiteError(path, "unknown key in defaults", line=defaults.lines[key], key=f"defaults.{key}",
                             hint=f"did you mean {match[0]!r}?" if match else "defaults set fields of check kinds")
