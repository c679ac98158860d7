"""Safe YAML loading that keeps what the user wrote: line numbers and raw scalars.

Built on ``yaml.SafeLoader`` only. On top of it: duplicate keys are an error
(PyYAML silently keeps the last), floats such as ``1e-5`` are floats (YAML 1.1
reads them as strings), and every mapping remembers the line and the source text
of each value so that validation errors can quote them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from harness.errors import SuiteError


class YamlMap(dict):  # type: ignore[type-arg]
    """A dict that remembers where each key sits in the file and its raw text."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.line: int | None = None
        self.lines: dict[str, int] = {}
        self.raw: dict[str, str] = {}
        self.unquoted: dict[str, tuple[str, Any]] = {}  # keys YAML read as non-text: the text as written, the value


def non_text_problem(written: str, value: Any) -> str:
    """A name YAML read as a number or a boolean: what it became, and that quoting keeps it as written."""
    kind = {bool: "a boolean", int: "an integer", float: "a number"}.get(type(value), type(value).__name__)
    became = "" if str(value) == written else f" {value!r}"
    return (f"{written} is read by YAML as {kind}{became}, not as a name; quote it to keep it as written: "
            f"'{written}'")


class YamlList(list):  # type: ignore[type-arg]
    """A list that remembers the line of each element."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.line: int | None = None
        self.lines: list[int] = []


_FLOAT_12 = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)$")


class _Loader(yaml.SafeLoader):
    pass


# YAML 1.1 has no float without a dot before the exponent; YAML 1.2 and users do.
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", _FLOAT_12, list("-+0123456789.")
)


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> YamlMap:
    """A mapping; a key written twice is an error, but a key written over one merged in by ``<<:`` is
    the standard YAML override (``<<: *base`` then ``id: other``)."""
    written = sum(1 for key_node, _ in node.value if key_node.tag != "tag:yaml.org,2002:merge")
    loader.flatten_mapping(node)
    merged = len(node.value) - written  # flatten_mapping puts the merged pairs first
    result = YamlMap()
    result.line = node.start_mark.line + 1
    result.lines = {}
    result.raw = {}
    from_merge: set[str] = set()
    for index, (key_node, value_node) in enumerate(node.value):
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, (str, int, float, bool)) or key is None:
            raise yaml.constructor.ConstructorError(
                None, None, f"unsupported mapping key {key!r}", key_node.start_mark
            )
        skey = str(key)
        if index < merged:  # merged in: a later merged map overrides an earlier one
            from_merge.add(skey)
            result.raw.pop(skey, None)
        elif skey in from_merge:  # written over a merged value: the standard override
            from_merge.discard(skey)
            result.raw.pop(skey, None)
        elif skey in result.lines:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate key {skey!r} (first at line {result.lines[skey]}); "
                "YAML would silently keep only the last one",
                key_node.start_mark,
            )
        result[skey] = loader.construct_object(value_node, deep=True)
        result.lines[skey] = value_node.start_mark.line + 1
        if not isinstance(key, str):
            result.unquoted[skey] = (str(key_node.value), key)
        if isinstance(value_node, yaml.ScalarNode):
            result.raw[skey] = value_node.value
    return result


def _construct_sequence(loader: _Loader, node: yaml.SequenceNode) -> YamlList:
    result = YamlList(loader.construct_object(child, deep=True) for child in node.value)
    result.line = node.start_mark.line + 1
    result.lines = [child.start_mark.line + 1 for child in node.value]
    return result


def _construct_str(loader: _Loader, node: yaml.ScalarNode) -> str:
    """Text, with ``\\uD83D\\uDE00``-style surrogate pairs joined; a lone surrogate is an error.

    A lone surrogate is not Unicode text: no tokenizer takes it and no golden file can hold it.
    """
    value = str(loader.construct_scalar(node))
    if not any(0xD800 <= ord(c) <= 0xDFFF for c in value):
        return value
    joined = value.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")
    bad = next((c for c in joined if 0xD800 <= ord(c) <= 0xDFFF), None)
    if bad is not None:
        raise yaml.constructor.ConstructorError(
            None, None,
            f"the text holds a lone surrogate \\u{ord(bad):04x}, which is not a character: it cannot be "
            "tokenized nor written to a golden file. Fix: write the character itself, or both halves of its "
            "surrogate pair (\\ud83d\\ude00 for U+1F600)",
            node.start_mark,
        )
    return joined


def _construct_float(loader: _Loader, node: yaml.ScalarNode) -> float:
    """A float; ``.nan`` is refused: every comparison with it is false, so a budget of NaN never fails."""
    value = loader.construct_yaml_float(node)
    if value != value:
        raise yaml.constructor.ConstructorError(
            None, None, "'.nan' is not a number: a budget or tolerance of NaN passes every comparison, so it "
            "would never fail. Fix: write a number, or remove the key", node.start_mark,
        )
    return value


_Loader.add_constructor("tag:yaml.org,2002:str", _construct_str)
_Loader.add_constructor("tag:yaml.org,2002:float", _construct_float)
_Loader.add_constructor("tag:yaml.org,2002:map", _construct_mapping)
_Loader.add_constructor("tag:yaml.org,2002:seq", _construct_sequence)


def load_yaml(path: Path, *, what: str = "file") -> Any:
    """Parse ``path`` safely; any YAML problem becomes a SuiteError with its line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SuiteError(path, f"cannot read this {what}: {exc}") from None
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except RecursionError:
        raise SuiteError(
            path, f"this {what} is nested too deeply to be read (lists or mappings inside each other "
            "hundreds of levels deep)", hint="a suite needs only a few levels; look for a runaway run of '[' or '-'",
        ) from None
    except yaml.constructor.ConstructorError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else None
        problem = exc.problem or str(exc)
        hint = None
        if "could not determine a constructor" in problem:
            tag = re.search(r"'([^']+)'", problem)
            problem = f"unsafe or unknown YAML tag {tag.group(1) if tag else ''}".rstrip()
            hint = "remove the tag: suites and registries are plain data, nothing in them is executed"
        raise SuiteError(path, problem, line=line, hint=hint) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise SuiteError(
            path, f"YAML does not parse: {problem}", line=line, hint="check indentation and quoting"
        ) from None


def line_of(root: Any, loc: tuple[Any, ...]) -> tuple[int | None, str | None]:
    """The line of the deepest existing node along ``loc`` and the key path text."""
    node = root
    line = getattr(root, "line", None)
    parts: list[str] = []
    for part in loc:
        if isinstance(node, YamlMap) and isinstance(part, str) and part in node:
            line = node.lines.get(part, line)
            parts.append(part)
            node = node[part]
        elif isinstance(node, YamlList) and isinstance(part, int) and 0 <= part < len(node):
            line = node.lines[part]
            parts.append(f"[{part}]")
            node = node[part]
        else:
            parts.append(str(part))
            break
    key = ".".join(parts).replace(".[", "[") if parts else None
    return line, key


def raw_of(root: Any, loc: tuple[Any, ...]) -> str | None:
    """The text the user wrote for the scalar at ``loc``, when known."""
    node = root
    for part in loc[:-1]:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return None
    if isinstance(node, YamlMap) and loc and isinstance(loc[-1], str):
        return node.raw.get(loc[-1])
    return None
