"""Turn pydantic validation errors into one SuiteError with file, line, key and fix."""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from harness.errors import SuiteError
from harness.suites.yamlload import line_of, raw_of

M = TypeVar("M", bound=BaseModel)


def validate(cls: type[M], data: Any, *, path: Path, root: Any, loc: tuple[Any, ...] = ()) -> M:
    """Validate ``data`` (found at ``loc`` inside ``root``) as ``cls``.

    Strictly: YAML already gives values their types, so ``max_new_tokens: true`` or
    ``"32"`` is a mistake to report, not a value to coerce (ints still count as floats).
    Every number must be finite, whatever the kind or field (see ``nonfinite_at``).
    """
    where = nonfinite_at(data)
    if where is not None:
        full = loc + where
        line, key = line_of(root, full)
        raw = raw_of(root, full)
        raise SuiteError(path, f"{raw or 'this value'} is not a finite number: a budget, tolerance or setting of "
                         "infinity (or NaN) passes or fails every comparison, so it judges nothing",
                         line=line, key=key, hint="write a number, or remove the key to use the default")
    try:
        return cls.model_validate(data, strict=True)
    except ValidationError as exc:
        raise to_suite_error(exc, cls=cls, path=path, root=root, loc=loc) from None


def nonfinite_at(data: Any, loc: tuple[Any, ...] = ()) -> tuple[Any, ...] | None:
    """Where the first infinite or NaN number sits in ``data``, or None.

    The one rule for numeric fields of every check kind (and the registry): a field that
    accepts ``.inf`` here and refuses it there reads as a rule nobody can learn, and an
    infinite bound never fails.
    """
    if isinstance(data, float):
        return None if math.isfinite(data) else loc
    if isinstance(data, dict):
        items: Any = data.items()
    elif isinstance(data, (list, tuple)):
        items = enumerate(data)
    else:
        return None
    for key, value in items:
        found = nonfinite_at(value, (*loc, key))
        if found is not None:
            return found
    return None


def to_suite_error(
    exc: ValidationError, *, cls: type[BaseModel], path: Path, root: Any, loc: tuple[Any, ...]
) -> SuiteError:
    errors = exc.errors()
    # a union (json: true | {schema: ...}) reports each member's error: the one that is not "wrong type" says more
    err = next((e for e in errors if not str(e["type"]).endswith("_type")), errors[0]) if len(errors) > 1 else errors[0]
    # pydantic adds union member tags such as "function-after[...]" to locations
    inner = tuple(p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or "-" in p and p.startswith("function"))))
    inner = _without_member_tags(data_at(root, loc), inner)
    full = loc + inner
    line, key = line_of(root, full)
    message = str(err["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    hint: str | None = None
    raw = raw_of(root, full)
    if err["type"] == "extra_forbidden":
        message = "unknown key"
        known = _fields_at(cls, inner[:-1])
        match = difflib.get_close_matches(str(inner[-1]), known, n=1, cutoff=0.6)
        if match:
            hint = f"did you mean {match[0]!r}?"
        elif known:
            hint = "allowed keys here: " + ", ".join(sorted(known))
    elif err["type"] == "missing":
        message = "required field is missing"
    elif err["type"] in _WANTED:
        message = f"expected {_WANTED[err['type']]}, but YAML read {_yaml_kind(err.get('input'))}"
        if raw is not None:
            message += f" (you wrote {raw!r})"
    elif raw is not None:
        message += f" (you wrote {raw!r})"
    return SuiteError(path, message, line=line, key=key, hint=hint)


def data_at(root: Any, loc: tuple[Any, ...]) -> Any:
    node = root
    for part in loc:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return None
    return node


def _without_member_tags(data: Any, loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """``loc`` without the union member names pydantic inserts (``json.JsonExpectation.schema``): a part
    that is not a key of the data, followed by one that is."""
    out: list[Any] = []
    node = data
    for index, part in enumerate(loc):
        nxt = loc[index + 1] if index + 1 < len(loc) else None
        if isinstance(node, dict) and isinstance(part, str) and part not in node and nxt in node:
            continue
        out.append(part)
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            node = None
    return tuple(out)


_WANTED = {
    "int_type": "a whole number", "float_type": "a number", "string_type": "text",
    "bool_type": "true or false", "list_type": "a list", "dict_type": "a mapping",
    "model_type": "a mapping", "model_attributes_type": "a mapping",
}


def _yaml_kind(value: Any) -> str:
    """What YAML made of what the user wrote, in the user's words."""
    if isinstance(value, bool):
        return "a boolean (YAML reads true/false, yes/no, on/off as booleans)"
    if isinstance(value, int):
        return "a whole number"
    if isinstance(value, float):
        return "a decimal number"
    if isinstance(value, str):
        return "text (quoted, or not a number YAML recognizes)"
    if value is None:
        return "nothing (null)"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def _fields_at(cls: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the (nested) model that owns the location ``loc``."""
    current: Any = cls
    for part in loc:
        if isinstance(part, int):
            continue
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return []
        current = _model_in(fields[part].annotation)
        if current is None:
            return []
    return [name for name in getattr(current, "model_fields", {})]


def _model_in(annotation: Any) -> Any:
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None
