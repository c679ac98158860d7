"""Bad input, values: numbers too large to be what they name, schemas that refer to themselves, limits a session
cannot use, and names YAML reads as numbers. Each is one paragraph before anything runs (a usage error, exit 4,
or a suite/registry error naming the line), never an INTERNALERROR or a traceback.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import suite_error
from harness.errors import SuiteError
from harness.models.placement import check_max_memory, parse_max_memory
from harness.models.registry import load_registry
from harness.run.shard import MAX_SHARDS, Shard

GEN = "checks:\n  - {id: capital, kind: greedy, prompt: 'The capital of France is', max_new_tokens: 2}\n"


# -- --shard ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, said", [
    pytest.param("1/100000000000000000000", f"N may be at most {MAX_SHARDS}", id="example: N past a machine word"),
    pytest.param("1/" + "9" * 5000, f"N may be at most {MAX_SHARDS}", id="N of 5000 digits (int() refuses them)"),
    pytest.param("100000000000000000000/3", "K must be between 1 and N", id="K past a machine word"),
    pytest.param(f"1/{MAX_SHARDS + 1}", f"N may be at most {MAX_SHARDS}", id="one shard too many"),
])
def test_a_shard_number_too_large_is_a_usage_error(pytester, value, said):
    with pytest.raises(ValueError, match=said):
        Shard.parse(value)
    pytester.makepyfile("def test_x():\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--shard", value)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    text = result.stdout.str() + result.stderr.str()
    assert said in text and "INTERNALERROR" not in text and "Traceback" not in text
    assert len(max(text.splitlines(), key=len)) < 400  # the value is shortened, not echoed in full


def test_the_largest_shard_count_is_accepted():
    assert Shard.parse(f"{MAX_SHARDS}/{MAX_SHARDS}") == Shard(MAX_SHARDS, MAX_SHARDS)
    assert Shard.parse("0002/0003") == Shard(2, 3)


# -- expect: JSON schemas that refer to themselves -----------------------------------------------------------------
def _expect(schema: str) -> str:
    return f"""
suite: s
checks:
  - id: answer
    kind: expect
    prompt: "Give me JSON"
    max_new_tokens: 4
    expect:
      - json: {{schema: {schema}}}
"""


@pytest.mark.parametrize("schema", [
    pytest.param('{$ref: "#"}', id="example: the schema is its own reference"),
    pytest.param('{not: {$ref: "#"}}', id="through not"),
    pytest.param('{anyOf: [{type: string}, {$ref: "#"}]}', id="through anyOf"),
    pytest.param('{$defs: {a: {allOf: [{$ref: "#/$defs/b"}]}, b: {$ref: "#/$defs/a"}}, '
                 'properties: {x: {$ref: "#/$defs/a"}}}', id="two definitions referring to each other"),
])
def test_a_schema_whose_ref_never_ends_is_a_suite_error(tmp_path, schema):
    text = suite_error(tmp_path, _expect(schema))
    assert "refers to itself without end" in text and "bad.yaml:" in text and "Fix:" in text
    assert "RecursionError" not in text and "\n" not in text.strip()


@pytest.mark.parametrize("schema", [
    pytest.param('{type: object, properties: {child: {$ref: "#"}}}', id="a tree of objects"),
    pytest.param('{type: array, items: {$ref: "#"}}', id="nested lists"),
    pytest.param('{$defs: {n: {type: integer}}, $ref: "#/$defs/n"}', id="a reference to a definition"),
])
def test_a_recursive_schema_that_descends_is_accepted(tmp_path, schema):
    from harness.suites.spec import load_suite

    path = tmp_path / "ok.yaml"
    path.write_text(_expect(schema))
    load_suite(path)


def test_an_answer_nested_past_pythons_limit_is_a_finding_not_a_crash():
    from harness.checks.expect_assertions import JsonExpectation, _json_problem

    expected = JsonExpectation.model_validate({"schema": {"type": "array", "items": {"$ref": "#"}}})
    assert "nested deeper than Python" in _json_problem(expected, "[" * 300 + "]" * 300)  # the validator's limit
    assert "nested deeper than Python" in _json_problem(expected, "[" * 5000 + "]" * 5000)  # the JSON reader's
    assert _json_problem(expected, "[[], [[]]]") is None


# -- --max-memory -------------------------------------------------------------------------------------------------
def test_max_memory_takes_the_plain_bytes_its_message_offers():
    assert parse_max_memory("cpu=2000000000") == {"cpu": 2000000000}  # example
    assert check_max_memory({"cpu": "2000000000", "disk": 10**12}) == {"cpu": 2000000000, "disk": 10**12}
    for bad in ("cpu=0", "cpu=-5", "cpu=1.5"):
        with pytest.raises(ValueError, match="give a size such as 20GiB, 512MB or a number of bytes"):
            parse_max_memory(bad)


@pytest.mark.parametrize("limits", ["0=20GiB", "cpu=1GiB,1=8GiB", "cuda:0=4GiB"])
def test_gpu_limits_on_a_cpu_session_are_a_usage_error_before_anything_runs(project, limits):
    """Example: --max-memory 0=20GiB with --device cpu was found only when the variant loaded (exit 1)."""
    project.suite("gen", GEN)
    result = project.run("--device", "cpu", "--max-memory", limits)
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str()
    result.stderr.fnmatch_lines([f"*--max-memory {limits}: max_memory names *, a GPU, but this session runs on the "
                                 "CPU*give only cpu (and disk) limits. Nothing was run."])
    assert "Traceback" not in result.stderr.str() + result.stdout.str()


# -- registry names YAML reads as numbers or booleans -----------------------------------------------------------
@pytest.mark.parametrize("written, read_as", [
    pytest.param("123", "an integer", id="example: 123"),
    pytest.param("1.5", "a number", id="example: 1.5"),
    pytest.param("true", "a boolean True", id="example: true"),
    pytest.param("0x10", "an integer 16", id="example: 0x10 read as 16"),
    pytest.param("1e3", "a number 1000.0", id="1e3"),
    pytest.param("017", "an integer 15", id="a YAML 1.1 octal"),
    pytest.param("no", "a boolean False", id="no"),
    pytest.param("1_000", "an integer 1000", id="1_000"),
])
def test_a_model_name_yaml_reads_as_a_number_says_to_quote_it_as_written(tmp_path, written, read_as):
    registry = tmp_path / "models.yaml"
    registry.write_text(f"default: m\nmodels:\n  m: {{path: m}}\n  {written}: {{path: m}}\n")
    with pytest.raises(SuiteError) as info:
        load_registry(registry)
    text = str(info.value)
    assert f"model name {written} is read by YAML as {read_as}, not as a name; quote it to keep it as written: " \
           f"'{written}'" in text, text
    assert "models.yaml:4" in text and f"write '{written}': in place of {written}:" in text


@pytest.mark.parametrize("written", ["0x10", "123", "yes"])
def test_a_default_yaml_reads_as_a_number_says_to_quote_it(tmp_path, written):
    registry = tmp_path / "models.yaml"
    registry.write_text(f"default: {written}\nmodels:\n  m: {{path: m}}\n")
    with pytest.raises(SuiteError) as info:
        load_registry(registry)
    assert f"default {written} is read by YAML as" in str(info.value) and f"default: '{written}'" in str(info.value)


def test_a_quoted_numeric_name_is_a_name(tmp_path):
    registry = tmp_path / "models.yaml"
    registry.write_text("default: '0x10'\nmodels:\n  '0x10': {path: m}\n")
    assert list(load_registry(registry).models) == ["0x10"]


def test_a_numeric_model_name_in_a_run_is_one_paragraph(project):
    project.suite("gen", GEN)
    registry = project.path / "models.yaml"
    registry.write_text(registry.read_text() + "  1.5:\n    path: fixtures\n")
    result = project.run("--collect-only")
    text = result.stdout.str() + result.stderr.str()
    assert result.ret != 0 and "model name 1.5 is read by YAML as a number" in text, text
    assert "Traceback" not in text
