"""The suite reference and the JSON schema: generated from the spec classes, committed up to date, and
agreeing with the loader (``harness-validate``) on what is a valid suite. No model is loaded."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from harness.checks import get_check, known_kinds
from harness.errors import SuiteError
from harness.suites.spec import SUITE_KEYS, load_suite
from harness.suites.reference import (
    DOCS_COMMAND, EXAMPLES, SCHEMA_PATH, example_suite, reference_markdown, schema_text, suite_schema,
)
from harness.suites.validate import main as validate_main
from harness.suites.yamlload import load_yaml

REPO = Path(__file__).resolve().parents[1]
SUITES = sorted((REPO / "suites").glob("*.yaml")) + sorted((REPO / "bench" / "suites").glob("*.yaml"))
MODELINE = "# yaml-language-server: $schema="


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def schema_errors(validator: jsonschema.Draft202012Validator, path: Path) -> list[str]:
    """What an editor would flag: the schema's errors on the file as YAML 1.2 reads it (``1e-5`` a number),
    with those of each kind's alternative under the union of kinds (an editor shows the matching kind's)."""
    def flat(errors: Any) -> list[str]:
        return [m for error in errors for m in [error.message, *flat(error.context or [])]]

    return flat(validator.iter_errors(load_yaml(path)))


# ---------------------------------------------------------------------------- generated, and up to date


def test_the_committed_schema_and_reference_are_those_the_code_generates():
    assert SCHEMA_PATH.read_text(encoding="utf-8") == schema_text(), \
        f"harness/suites/suite.schema.json is stale: run `{DOCS_COMMAND}` and commit the result"
    assert (REPO / "docs" / "suites.md").read_text(encoding="utf-8") == reference_markdown(), \
        f"docs/suites.md is stale: run `{DOCS_COMMAND}` and commit the result"


def test_the_doc_generator_writes_both_files(tmp_path):
    run = subprocess.run([sys.executable, str(REPO / "docs" / "generate.py"), "--only", "suite-reference",
                          "--docs-root", str(tmp_path)], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "docs" / "suites.md").read_text(encoding="utf-8") == reference_markdown()
    assert (tmp_path / "harness" / "suites" / "suite.schema.json").read_text(encoding="utf-8") == schema_text()


def test_the_schema_is_shipped_with_the_package():
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    assert '"suites/suite.schema.json"' in pyproject and 'harness-validate = "harness.suites.validate:main"' in pyproject
    assert SCHEMA_PATH.parent == REPO / "harness" / "suites"


def test_every_key_of_every_kind_has_a_description():
    """A key with no description would show as a blank row in docs/suites.md and no hover in an editor."""
    schema = suite_schema()
    missing = [f"{name}.{key}" for name, definition in schema["$defs"].items()
               for key, prop in definition.get("properties", {}).items()
               if key != "kind" and not prop.get("description")]
    missing += [key for key, prop in schema["properties"].items() if not prop.get("description")]
    assert not missing, f"add Field(description=...) for: {', '.join(missing)}"
    kinds = [name for name, d in schema["$defs"].items() if "kind" in d.get("properties", {})]
    assert all(schema["$defs"][name].get("description") for name in kinds), "each kind's Spec needs a docstring"


def test_the_reference_names_every_kind_and_key_with_its_default():
    text = reference_markdown()
    for kind in known_kinds():
        assert f"\n### {kind}\n" in text
        for key in get_check(kind).Spec.model_fields:
            assert f"| `{key}` |" in text or key == "atol", (kind, key)
    for key in SUITE_KEYS:
        assert f"| `{key}` |" in text
    assert "| `max_new_tokens` | whole number >= 1, <= 4096 | `32` |" in text  # greedy's
    assert "| `min_pass_rate` | number > 0, <= 1 | `0.75` |" in text
    assert "| `roundtrip` | one of `exact`, `strip`, `none` | `exact` |" in text
    assert "atol" not in text  # kept only to refuse it with a pointer to tolerance


def test_the_top_level_keys_are_the_loaders_and_checks_are_a_union_on_kind():
    schema = suite_schema()
    assert set(schema["properties"]) == set(SUITE_KEYS)
    assert schema["additionalProperties"] is False and schema["required"] == ["checks"]
    items = schema["properties"]["checks"]["items"]
    assert items["discriminator"]["propertyName"] == "kind"
    assert set(items["discriminator"]["mapping"]) == set(known_kinds())
    for ref in items["discriminator"]["mapping"].values():
        spec = schema["$defs"][ref.removeprefix("#/$defs/")]
        assert spec["additionalProperties"] is False and {"id", "kind"} <= set(spec["required"])
    assert schema["properties"]["defaults"]["additionalProperties"] is False
    assert not {"id", "kind"} & set(schema["properties"]["defaults"]["properties"])


# ---------------------------------------------------------------------------- examples and default suites


@pytest.mark.parametrize("kind", known_kinds())
def test_each_kind_has_a_complete_example_that_validates(kind, tmp_path, validator):
    assert kind in EXAMPLES, f"add an example for {kind!r} to harness.suites.reference.EXAMPLES"
    path = tmp_path / "example.yaml"
    path.write_text(example_suite(kind), encoding="utf-8")
    suite = load_suite(path)
    assert [entry.check.kind for entry in suite.checks] == [kind]
    assert schema_errors(validator, path) == []
    assert f"```yaml\n{example_suite(kind)}```" in reference_markdown()


@pytest.mark.parametrize("path", SUITES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_committed_suite_validates_and_names_the_schema_on_its_first_line(path, validator):
    assert schema_errors(validator, path) == []
    load_suite(path)
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith(MODELINE), f"{path.name}: the first line should name the schema for editors"
    assert (path.parent / first.removeprefix(MODELINE)).resolve() == SCHEMA_PATH


def test_the_validating_command_accepts_the_committed_suites(capsys):
    assert validate_main([str(REPO / "suites"), str(REPO / "bench" / "suites")]) == 0
    assert f"{len(SUITES)} of {len(SUITES)} suites valid" in capsys.readouterr().out


# ---------------------------------------------------------------------------- the schema and the loader agree


BAD = {
    "unknown-key": ("""\
        suite: bad
        checks:
          - id: capital
            kind: greedy
            prompt: "The capital of France is"
            max_new_token: 8
        """, "bad.yaml:6: checks[0].max_new_token: unknown key. Fix: did you mean 'max_new_tokens'?",
        "'max_new_token' was unexpected"),
    "wrong-type": ("""\
        suite: bad
        checks:
          - id: capital
            kind: greedy
            prompt: "The capital of France is"
            max_new_tokens: "eight"
        """, "bad.yaml:6: checks[0].max_new_tokens: expected a whole number", "'eight' is not of type 'integer'"),
    "missing-id": ("""\
        suite: bad
        checks:
          - kind: greedy
            prompt: "The capital of France is"
        """, "bad.yaml:3: checks[0].id: required field is missing", "'id' is a required property"),
    "unknown-kind": ("""\
        checks:
          - id: capital
            kind: greddy
            prompt: "The capital of France is"
        """, "bad.yaml:3: checks[0].kind: unknown check kind 'greddy'. Fix: did you mean 'greedy'?",
        "'greedy' was expected"),
    "unknown-top-level-key": ("""\
        suite: bad
        check:
          - id: capital
        """, "bad.yaml:3: check: unknown key. Fix: did you mean 'checks'?", "'check' was unexpected"),
    "unknown-key-in-defaults": ("""\
        defaults:
          max_new_tokns: 4
        checks:
          - id: capital
            kind: greedy
            prompt: "The capital of France is"
        """, "bad.yaml:2: defaults.max_new_tokns: unknown key in defaults", "'max_new_tokns' was unexpected"),
    "unknown-key-in-a-tolerance": ("""\
        checks:
          - id: capital
            kind: greedy
            prompt: "The capital of France is"
            tolerance: {tie_gp: 0.1}
        """, "bad.yaml:5: checks[0].tolerance.tie_gp: unknown key", "'tie_gp' was unexpected"),
    "wrong-variant": ("""\
        variants: [fp32]
        checks:
          - id: capital
            kind: greedy
            prompt: "The capital of France is"
        """, "bad.yaml:1: variants: 'variants' must be a list out of fp16, nf4, fp16-lora, nf4-lora",
        "'fp32' is not one of"),
}


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


@pytest.mark.parametrize("case", list(BAD))
def test_the_schema_and_the_command_reject_the_same_file(case, tmp_path, validator, capsys, monkeypatch):
    text, message, schema_message = BAD[case]
    path = _write(tmp_path, text)
    errors = schema_errors(validator, path)
    assert errors, f"the schema accepts the {case} suite the loader refuses"
    assert any(schema_message in error for error in errors), errors  # for the same reason
    with pytest.raises(SuiteError):
        load_suite(path)
    monkeypatch.chdir(tmp_path)
    assert validate_main(["bad.yaml"]) == 2
    out, err = capsys.readouterr()
    assert err.startswith(message) and err.count("\n") == 1, err  # the loader's one paragraph, as pytest shows it
    assert "0 of 1 suite valid, 1 with a problem" in out


def test_defaults_are_typed_by_the_kinds_that_take_them(tmp_path, validator):
    good = _write(tmp_path, """\
        defaults:
          max_new_tokens: 4
          tolerance: {nf4: {tie_gap: 0.5}}
        checks:
          - id: capital
            kind: greedy
            prompt: "The capital of France is"
        """)
    assert schema_errors(validator, good) == []
    load_suite(good)
    bad = _write(tmp_path, "defaults:\n  max_new_tokens: four\nchecks:\n  - {id: a, kind: greedy, prompt: x}\n")
    assert schema_errors(validator, bad)
    with pytest.raises(SuiteError, match="max_new_tokens: expected a whole number"):
        load_suite(bad)


# ---------------------------------------------------------------------------- the command


def test_the_command_reports_every_bad_file_and_a_suite_name_used_twice(tmp_path, capsys):
    (tmp_path / "suites").mkdir()
    good = "checks:\n  - {id: capital, kind: greedy, prompt: \"The capital of France is\"}\n"
    (tmp_path / "suites" / "a.yaml").write_text("suite: same\n" + good, encoding="utf-8")
    (tmp_path / "suites" / "b.yml").write_text("suite: same\n" + good, encoding="utf-8")
    (tmp_path / "suites" / "c.yaml").write_text("suite: c\nchecks: []\n", encoding="utf-8")
    (tmp_path / "suites" / "notes.txt").write_text("not a suite", encoding="utf-8")
    assert validate_main([str(tmp_path / "suites")]) == 2
    out, err = capsys.readouterr()
    assert "b.yml" in err and "suite name 'same' is also used by" in err
    assert "c.yaml:2: checks: 'checks' must be a non-empty list" in err
    assert "1 of 3 suites valid, 2 with a problem" in out


@pytest.mark.parametrize("argv, message", [
    (["nowhere"], "nowhere: no such file or folder"),
    (["."], "no *.yaml or *.yml file in this folder"),
    (["notes.txt"], "not a YAML file"),
])
def test_a_path_with_no_suite_is_a_usage_error(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("x", encoding="utf-8")
    assert validate_main(argv) == 2
    assert message in capsys.readouterr().err


def test_the_command_loads_no_model_library_and_prints_the_schema_path(tmp_path):
    code = ("import sys; from harness.suites.validate import main; rc = main([sys.argv[1]]); "
            "heavy = [m for m in ('torch', 'transformers', 'peft', 'bitsandbytes') if m in sys.modules]; "
            "assert not heavy, heavy; sys.exit(rc)")
    run = subprocess.run([sys.executable, "-c", code, str(REPO / "suites")], capture_output=True, text=True,
                         cwd=tmp_path, check=False)
    assert run.returncode == 0, run.stderr
    path = subprocess.run([sys.executable, "-m", "harness.suites.validate", "--schema-path"], capture_output=True,
                          text=True, cwd=tmp_path, check=False)
    assert path.returncode == 0 and Path(path.stdout.strip()) == SCHEMA_PATH
