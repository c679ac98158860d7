"""The suite reference (docs/suites.md) and the JSON schema of suite files, both made from the spec classes.

The loader (``harness.suites.spec``) is the one validator; this module only describes what it accepts,
to editors (``suite.schema.json``, named by a ``# yaml-language-server: $schema=`` line) and to
readers (``docs/suites.md``). Keys, types, defaults and meanings come from the pydantic spec
classes and their ``Field(description=...)``; ``python docs/generate.py --only suite-reference``
writes both files, and a test regenerates them and compares, so neither can drift from the code.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import ConfigDict, Field, create_model
from pydantic.json_schema import GenerateJsonSchema
from pydantic_core import core_schema

from harness.checks import CheckSpec, get_check, known_kinds
from harness.suites.spec import SUITE_KEYS
from harness.models.variants import ALL_KEYS

SCHEMA_PATH = Path(__file__).with_name("suite.schema.json")
COMMON_KEYS = ("id", "kind", "description", "variants", "models")
DOCS_COMMAND = "python docs/generate.py --only suite-reference"

# One complete, minimal check per kind: the reference shows each inside a suite file, and a test
# validates each with the loader and with the schema.
EXAMPLES: dict[str, str] = {
    "batch": """\
        - id: batch-rows
          kind: batch
          prompts: ["The capital of France is"]
          batch_sizes: [2, 4]
        """,
    "cache": """\
        - id: kv-cache
          kind: cache
          prompts: ["The capital of France is"]
          max_new_tokens: 6
        """,
    "chat_template": """\
        - id: rendering
          kind: chat_template
          conversations:
            greeting:
              - {role: system, content: "You are a concise assistant."}
              - {role: user, content: "Hi"}
        """,
    "drift": """\
        - id: drift
          kind: drift
          prompts: ["The capital of France is"]
          new_tokens: 8
          budgets:
            my-model:
              nf4: {max_mean_kl: 1.6, min_top1_agreement: 0.5}
              fp16-lora: {min_mean_kl: 0.2}
        """,
    "expect": """\
        - id: capital-paris
          kind: expect
          models: [my-model]
          prompt: "The capital of France is"
          max_new_tokens: 6
          expect:
            - contains: "Paris"
        """,
    "generation_config": """\
        - id: generation-settings
          kind: generation_config
        """,
    "greedy": """\
        - id: capital-raw
          kind: greedy
          prompt: "The capital of France is"
          max_new_tokens: 12
        """,
    "kernels": """\
        - id: attention-kernels
          kind: kernels
          implementations: [sdpa, eager]
        """,
    "lora_merge": """\
        - id: merge
          kind: lora_merge
          prompts: ["The capital of France is"]
          nf4_budget: {max_adapter_lost: 0.5}
        """,
    "memory": """\
        - id: footprint
          kind: memory
          workload:
            prompts: ["The capital of France is"]
            max_new_tokens: 4
          budgets:
            my-model:
              cpu:
                fp16: {max_weights_mb: 300}
          min_savings:
            - {variant: nf4, reference: fp16, of_expected: 0.95}
        """,
    "padding": """\
        - id: padding
          kind: padding
          sides: [left, right]
        """,
    "save_reload": """\
        - id: save-reload
          kind: save_reload
          prompts: ["The capital of France is"]
        """,
    "throughput": """\
        - id: speed
          kind: throughput
          prompt_tokens: 32
          new_tokens: 16
          budgets:
            my-model:
              cpu:
                fp16: {min_decode_tokens_per_s: 5}
        """,
    "tokenization": """\
        - id: prompts
          kind: tokenization
          texts: ["The capital of France is", "  leading and trailing spaces  "]
        """,
}


def example_suite(kind: str) -> str:
    """The example check of ``kind`` as a whole suite file."""
    return f"suite: my-suite\nchecks:\n{textwrap.indent(textwrap.dedent(EXAMPLES[kind]), '  ')}"


# ---------------------------------------------------------------------------- the JSON schema


class _WithFactoryDefaults(GenerateJsonSchema):
    """Pydantic leaves out defaults made by a factory (``Field(default_factory=list)``); an editor and a
    reader both want them."""

    def get_default_value(self, schema: core_schema.WithDefaultSchema) -> Any:
        if "default_factory" in schema and not schema.get("default_factory_takes_data"):
            return schema["default_factory"]()  # type: ignore[call-arg]
        return super().get_default_value(schema)


def suite_schema() -> dict[str, Any]:
    """The JSON schema of a suite file: the top-level keys, ``defaults``, and the checks as a union of the
    kinds discriminated on ``kind``, each closed (``additionalProperties: false``) like its spec class."""
    specs = tuple(get_check(kind).Spec for kind in known_kinds())
    check = Annotated[Union[specs], Field(discriminator="kind")]  # type: ignore[valid-type]
    suite_file = create_model(  # type: ignore[call-overload]
        "SuiteFile",
        __config__=ConfigDict(extra="forbid", title="Suite file of llm-behave-harness"),
        __doc__="A YAML behaviour suite: checks run against a model in each variant (docs/suites.md).",
        suite=(str, Field(None, description=SUITE_KEYS["suite"])),
        description=(str, Field("", description=SUITE_KEYS["description"])),
        defaults=(dict[str, Any], Field(default_factory=dict, description=SUITE_KEYS["defaults"])),
        variants=(list[Literal[ALL_KEYS]] | None, Field(None, min_length=1, description=SUITE_KEYS["variants"])),
        checks=(list[check], Field(min_length=1, description=SUITE_KEYS["checks"])),
    )
    schema = suite_file.model_json_schema(schema_generator=_WithFactoryDefaults)
    schema["properties"]["suite"].pop("default", None)  # the file's stem, not null
    schema["properties"]["defaults"] = {**_defaults_schema(schema), "description": SUITE_KEYS["defaults"]}
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def _defaults_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """``defaults:``: any key of any kind but ``id`` and ``kind``, typed as the kinds that have it type it."""
    found: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for kind, ref in sorted(_kind_refs(schema).items()):
        for key, prop in _definition(schema, ref)["properties"].items():
            if key not in ("id", "kind"):
                found.setdefault(key, []).append((kind, prop))
    properties: dict[str, Any] = {}
    for key in sorted(found):
        kinds = [kind for kind, _ in found[key]]
        shapes: list[dict[str, Any]] = []
        for _, prop in found[key]:
            shape = {k: v for k, v in prop.items() if k not in ("default", "description", "title")}
            if shape not in shapes:
                shapes.append(shape)
        every = len(kinds) == len(known_kinds())
        where = "every kind" if every else ", ".join(kinds)
        properties[key] = {**(shapes[0] if len(shapes) == 1 else {"anyOf": shapes}),
                           "description": f"Default `{key}` for {where}."}
    return {"type": "object", "additionalProperties": False, "properties": properties}


def _kind_refs(schema: dict[str, Any]) -> dict[str, str]:
    items = schema["properties"]["checks"]["items"]
    return dict(items["discriminator"]["mapping"])


def _definition(schema: dict[str, Any], ref: str) -> dict[str, Any]:
    return schema["$defs"][ref.removeprefix("#/$defs/")]


def schema_text() -> str:
    """The schema as committed: sorted keys, two-space indent, one final newline."""
    return json.dumps(suite_schema(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


# ---------------------------------------------------------------------------- the reference


def reference_markdown() -> str:
    """docs/suites.md: every top-level key, every kind and every key with its type, default and meaning."""
    schema = suite_schema()
    refs = _kind_refs(schema)
    kind_defs = {ref.removeprefix("#/$defs/") for ref in refs.values()}
    nested = sorted(name for name in schema["$defs"] if name not in kind_defs)
    anchors = {name: _anchor(name) for name in nested}
    out = [
        "# Suite reference",
        "",
        f"<!-- generated by `{DOCS_COMMAND}` from the spec classes (harness/checks/*.py, harness/suites/spec.py): "
        "do not edit; change a `Field(description=...)` and regenerate -->",
        "",
        "A suite is a YAML file under `suites/` (or named on the command line). Each check becomes one test "
        "per variant (`fp16`, `nf4`, `fp16-lora`, `nf4-lora`), or one per model for the kinds that do not "
        "depend on the variant. Unknown keys, wrong types and missing required keys are errors naming the "
        "file, the line and the key.",
        "",
        "Check suites without loading a model (exit 0: valid; 2: not, with one paragraph per problem):",
        "",
        "```sh",
        "harness-validate suites/ my-suite.yaml",
        "```",
        "",
        "Editors complete and check keys with the JSON schema shipped in the package, "
        "`harness/suites/suite.schema.json` (`harness-validate --schema-path` prints where it is installed): name it "
        "on the first line of a suite, as the default suites do (`suites/*.yaml` point at it by a relative "
        "path), for editors that use yaml-language-server (VS Code's YAML extension, Neovim, Helix, Zed):",
        "",
        "```yaml",
        "# yaml-language-server: $schema=../harness/suites/suite.schema.json",
        "```",
        "",
        "## The suite file",
        "",
        *_table(schema, schema, anchors, skip=()),
        "",
        "A minimal suite:",
        "",
        "```yaml",
        example_suite("greedy").rstrip("\n"),
        "```",
        "",
        "## Keys every check has",
        "",
        *_table(CheckSpec.model_json_schema(schema_generator=_WithFactoryDefaults), schema, anchors),
        "",
        "## Kinds",
        "",
        " ".join(f"[`{kind}`](#{_anchor(kind)})" for kind in sorted(refs)),
        "",
    ]
    for kind in sorted(refs):
        definition = _definition(schema, refs[kind])
        out += [f"### {kind}", "", _one_line(definition.get("description", "")), "", _runs(kind), ""]
        out += _table(definition, schema, anchors, skip=COMMON_KEYS)
        out += ["", "```yaml", example_suite(kind).rstrip("\n"), "```", ""]
    out += ["## Values inside keys", ""]
    for name in nested:
        definition = schema["$defs"][name]
        out += [f"### {_title(name)}", ""]
        if definition.get("description"):
            out += [_one_line(definition["description"]), ""]
        out += [*_table(definition, schema, anchors, skip=()), ""]
    return "\n".join(out).rstrip("\n") + "\n"


def _runs(kind: str) -> str:
    """How the kind runs: per variant or per model, with a golden or not, where it judges."""
    cls = get_check(kind)
    judged = [key for key in ALL_KEYS if not cls.unjudgeable(key)]
    where = ("once per model (the same in every variant)" if not cls.per_variant else
             "in each variant" if len(judged) == len(ALL_KEYS) else f"in {', '.join(judged)} only")
    golden = "compared with a golden file" if cls.uses_goldens else "no golden file"
    gpu = "; needs a CUDA device" if cls.needs_gpu else ""
    return f"Runs {where}; {golden}{gpu}."


def _table(definition: dict[str, Any], schema: dict[str, Any], anchors: dict[str, str], *,
           skip: tuple[str, ...] = ()) -> list[str]:
    """One row per key; a key kept only to refuse it with a pointer (``deprecated``) is left out."""
    required = set(definition.get("required", []))
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, prop in definition.get("properties", {}).items():
        if key in skip or prop.get("deprecated"):
            continue
        default = "required" if key in required else _default(prop)
        rows.append(f"| `{key}` | {_cell(_type(prop, anchors))} | {_cell(default)} | "
                    f"{_cell(_one_line(prop.get('description', '')))} |")
    return rows


def _type(prop: dict[str, Any], anchors: dict[str, str]) -> str:
    """A schema node in a reader's words: ``list of text``, ``whole number, 1 to 4096``."""
    if "enum" in prop:
        values = [v for v in prop["enum"] if v is not None]
        return "one of " + ", ".join(f"`{_scalar(v)}`" for v in values)
    if "const" in prop:
        return f"`{_scalar(prop['const'])}`"
    if "discriminator" in prop:
        return "check (see [Kinds](#kinds))"
    if "$ref" in prop:
        name = prop["$ref"].removeprefix("#/$defs/")
        return f"[{_title(name)}](#{anchors[name]})"
    if "anyOf" in prop or "oneOf" in prop:
        options = [o for o in prop.get("anyOf", prop.get("oneOf", [])) if o.get("type") != "null"]
        merged = [{**o, **({"items": prop["items"]} if "items" in prop and o.get("type") == "array" else {})}
                  for o in options]
        return " or ".join(_type(o, anchors) for o in merged)
    kind = prop.get("type")
    if kind == "array":
        text = f"list of {_type(prop.get('items', {}), anchors)}"
        if prop.get("minItems", 0) > 1:
            text += f" (at least {prop['minItems']})"
        return text
    if kind == "object":
        inner, depth = prop.get("additionalProperties"), 1
        if not isinstance(inner, dict) or not inner:
            return "mapping"
        while inner.get("type") == "object" and isinstance(inner.get("additionalProperties"), dict):
            inner, depth = inner["additionalProperties"], depth + 1
        levels = "" if depth == 1 else f", {depth} levels deep,"
        return f"mapping of names{levels} to {_type(inner, anchors)}"
    words = {"string": "text", "integer": "whole number", "number": "number", "boolean": "true or false"}
    return words.get(kind, "any value") + _range(prop)


def _range(prop: dict[str, Any]) -> str:
    low = (f">= {prop['minimum']:g}" if "minimum" in prop else
           f"> {prop['exclusiveMinimum']:g}" if "exclusiveMinimum" in prop else None)
    high = (f"<= {prop['maximum']:g}" if "maximum" in prop else
            f"< {prop['exclusiveMaximum']:g}" if "exclusiveMaximum" in prop else None)
    parts = [p for p in (low, high) if p]
    return f" {', '.join(parts)}" if parts else ""


def _default(prop: dict[str, Any]) -> str:
    if "default" not in prop:
        return ""
    value = prop["default"]
    if value == "":
        return '`""`'
    if isinstance(value, dict):
        value = {k: v for k, v in value.items() if v is not None}  # a nested model's unset bounds
    if value is None or value == [] or value == {}:
        return "unset" if value is None else "none"
    text = _flow(value)
    return f"`{text if len(text) <= 60 else text[:57] + '...'}`"


def _flow(value: Any) -> str:
    """``value`` as YAML flow text, as a suite would write it."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    if isinstance(value, str) and any(c in value for c in ",:{}[]#\"'\n") or value == "":
        return json.dumps(value, ensure_ascii=False)
    return _scalar(value)


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _cell(text: str) -> str:
    """Table cells: a ``|`` (as in ``|Δ log p|``) would end the cell."""
    return text.replace("|", "\\|")


def _one_line(text: str) -> str:
    """A description on one line, docstring-style ````code```` as Markdown's ```code```."""
    return " ".join(text.split()).replace("``", "`")


def _title(name: str) -> str:
    """A definition's name as a heading: pydantic names two classes of one name by their module."""
    return name.rsplit("__", 2)[-2] + "." + name.rsplit("__", 1)[-1] if "__" in name else name


def _anchor(name: str) -> str:
    """GitHub's heading anchor for a heading ``name`` (lowercase; dots and other punctuation dropped)."""
    text = _title(name).lower()
    return "".join(c for c in text if c.isalnum() or c in "-_ ").replace(" ", "-")
