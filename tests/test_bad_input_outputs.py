"""Bad input, outputs: every option of every command that writes a file or folder goes through the one rule
that keeps the golden folder out of reach (``harness.report.outputs.output_in_golden_problem``).

The options are enumerated from the parsers themselves (pytest's ``harness`` group, each console tool's
argparse parser), and each must be classified here as a writer or as not writing: a new option that
writes cannot be forgotten, since it fails the classification until it is tried below.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from test_bad_input_writers import GOLDEN, _files, with_golden  # noqa: F401  (a fixture, used by name)

from harness.report.outputs import (
    PYTEST_ERASED_OUTPUTS, PYTEST_OUTPUTS, PYTEST_PREFIX_OUTPUTS, LazyBinaryFile, LazyBenchmarkJson, opens_at_parse,
)


# -- pytest: the harness group's options ----------------------------------------------------------------------
HARNESS_READS = {  # options of the harness group that name no output (models, registries, selections, modes)
    "--model", "--reference", "--registry", "--variants", "--adapter", "--device", "--attn-implementation",
    "--device-map", "--max-memory", "--golden-dir", "--golden-device", "--allow-cross-device-in-ci", "--shard",
    "--one-pass-goldens", "--allow-update-in-ci", "--reference-adapter",
}
HARNESS_OWN_RULE = {"--harness-obtained"}  # stricter: may not contain the golden folder either (golden.overlap_problem)
PYTEST_WRITERS = {**PYTEST_OUTPUTS, **PYTEST_PREFIX_OUTPUTS, **PYTEST_ERASED_OUTPUTS}


def _pytest_options(pytester) -> dict[str, list[str]]:
    """Every option pytest knows in this environment, by group name."""
    config = pytester.parseconfig()
    groups = [config._parser._anonymous, *config._parser._groups]
    return {group.name: [name for option in group.options for name in option.names() if name.startswith("--")]
            for group in groups}


def test_every_option_of_the_harness_group_is_classified(pytester):
    harness = set(_pytest_options(pytester)["harness"])
    writers = harness & set(PYTEST_WRITERS)
    unclassified = harness - writers - HARNESS_READS - HARNESS_OWN_RULE
    assert not unclassified, (f"{sorted(unclassified)}: a new harness option; if it writes a file or folder, add it "
                              "to harness.report.outputs.PYTEST_OUTPUTS (then it is checked and tried below), else to "
                              "HARNESS_READS here")
    assert writers == {"--harness-report", "--harness-result", "--offload-folder"}


def _writer_cases(pytester) -> list[tuple[str, list[str]]]:
    """(flag, values) for every writer whose plugin is installed here: a golden file, the folder, a new file in it."""
    known = {name for names in _pytest_options(pytester).values() for name in names}
    cases = []
    for flag in sorted(PYTEST_WRITERS):
        if flag not in known:
            continue  # a plugin that is not installed here (pytest-reportlog, an old pytest-benchmark)
        folder = flag in ("--offload-folder", "--basetemp") or flag in PYTEST_PREFIX_OUTPUTS
        values = ["golden/smollm2-135m/new"] if folder else [GOLDEN, "golden/new.out"]
        if flag in ("--harness-result", "--offload-folder"):
            values.append("golden")
        cases += [(flag, [value]) for value in values]
    return cases


def test_every_pytest_writer_inside_the_golden_folder_is_refused_before_anything_is_written(with_golden, pytester):
    cases = _writer_cases(pytester)
    assert {"--harness-report", "--harness-result", "--offload-folder", "--junitxml", "--log-file",
            "--basetemp"} <= {flag for flag, _ in cases}
    before = _files(with_golden.golden)
    for flag, values in cases:
        result = with_golden.run("--variants", "fp16", flag, *values)
        err = result.stderr.str()
        assert result.ret == pytest.ExitCode.USAGE_ERROR, (flag, values, result.stdout.str() + err)
        assert f"{flag} {values[0]}" in err and "golden folder" in err and "Nothing was run" in err, err
        assert "Traceback" not in err + result.stdout.str() and "INTERNALERROR" not in err + result.stdout.str()
        assert _files(with_golden.golden) == before, (flag, values)  # nothing truncated, nothing added
        assert not (with_golden.golden / "smollm2-135m/new").exists()


def test_harness_result_and_offload_folder_naming_the_golden_folder_itself(with_golden):
    """Examples: a result written as golden/harness-result.json; offloaded weights filling the golden folder."""
    for args in (["--harness-result", "golden"], ["--harness-result", "golden/"], ["--harness-result", GOLDEN],
                 ["--offload-folder", "golden"], ["--device-map", "auto", "--offload-folder", "golden/offload"]):
        result = with_golden.run("--variants", "fp16", *args)
        assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str()
        assert "golden folder" in result.stderr.str() and "Traceback" not in result.stderr.str()
    assert not (with_golden.golden / "harness-result.json").exists() and not (with_golden.golden / "offload").exists()
    assert json.loads((with_golden.path / GOLDEN).read_text())["text"] == " Paris"


# -- pytest-benchmark's --benchmark-json, with whatever version is installed -----------------------------------
BENCH_TEST = """
def test_sum(benchmark):
    assert benchmark(sum, range(10)) == 45
"""


def test_benchmark_json_writes_its_report_with_the_installed_pytest_benchmark(pytester):
    """pytest-benchmark < 5.3 takes a file object (FileType, made lazy by the harness), 5.3+ a path it opens."""
    import pytest_benchmark

    pytester.makepyfile(test_bench=BENCH_TEST)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--benchmark-json", "out.json")
    assert result.ret == 0, result.stdout.str() + result.stderr.str()
    report = json.loads((pytester.path / "out.json").read_text())
    assert [b["name"] for b in report["benchmarks"]] == ["test_sum"], pytest_benchmark.__version__


def test_benchmark_json_in_the_golden_folder_is_refused_with_the_installed_pytest_benchmark(pytester):
    pytester.makepyfile(test_bench=BENCH_TEST)
    golden = pytester.path / "golden/m/cpu/fp16/gen/c.json"
    golden.parent.mkdir(parents=True)
    golden.write_text('{"text": "kept"}\n')
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--benchmark-json", str(golden))
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str()
    assert "inside the golden folder" in result.stderr.str()
    assert golden.read_text() == '{"text": "kept"}\n'  # not truncated while the command line was parsed


@pytest.mark.parametrize("option_type, lazy", [
    (argparse.FileType("wb"), True), (Path, False), (str, False), (None, False),
])
def test_only_a_type_that_opens_the_file_at_parse_time_is_replaced(option_type, lazy):
    assert opens_at_parse(option_type) is lazy
    action = argparse.ArgumentParser().add_argument("--benchmark-json", type=option_type)
    parser = argparse.Namespace(optparser=argparse.Namespace(_option_string_actions={"--benchmark-json": action}))
    LazyBenchmarkJson(parser).pytest_plugin_registered()
    assert (action.type is LazyBinaryFile) is lazy


def test_the_lazy_file_is_also_a_path(tmp_path):
    """Where a pytest-benchmark opens the option's value itself, the stand-in still names the file."""
    import os

    lazy = LazyBinaryFile(str(tmp_path / "b.json"))
    with open(lazy, "wb") as handle:  # what pytest-benchmark 5.3 does with its option
        handle.write(b"{}")
    assert os.fspath(lazy) == str(tmp_path / "b.json") and (tmp_path / "b.json").read_text() == "{}"


# -- the console tools ----------------------------------------------------------------------------------------
def _parsers() -> dict[str, argparse.ArgumentParser]:
    from harness.bench.run import _parser as bench
    from harness.calibrate.run import _parser as calibrate
    from harness.diff.cli import _parser as diff
    from harness.report.merge import _parser as merge

    report = merge()
    sub = next(a for a in report._actions if isinstance(a, argparse._SubParsersAction))
    return {"harness-bench": bench(), "harness-calibrate": calibrate(), "harness-diff": diff(),
            "harness-report merge": sub.choices["merge"]}


TOOL_WRITES = {"harness-bench": {"--out", "--work-dir"}, "harness-calibrate": {"--out"}, "harness-diff": {"--out"},
               "harness-report merge": {"--report", "--junitxml"}}
TOOL_READS = {
    "harness-bench": {"--model", "--config", "--sweep", "--bandwidth", "--registry", "--variants", "--adapter",
                      "--device", "--batch", "--prompt-tokens", "--new-tokens", "--rounds", "--warmup",
                      "--workload-batch", "--workload-tokens", "--drift-tokens", "--prompt", "--golden-dir"},
    "harness-calibrate": {"suites", "--model", "--registry", "--variants", "--adapter", "--device",
                          "--attn-implementation", "--conditions", "--env", "--max-new-tokens", "--max-prompts",
                          "--safety", "--regressions", "--golden-device", "--golden-dir",
                          "--worker"},  # internal: a subprocess's own job file, never on a user's command line
    "harness-diff": {"old", "new", "--base", "--registry", "--suites", "--max-prompts", "--new-tokens", "--quant",
                     "--device", "--golden-dir"},
    "harness-report merge": {"paths", "--golden-dir"},
}


NO_OUTPUTS = {"harness-validate": {"--schema-path"}}  # tools that write nothing: their options, all reads


def _help_options(entry: str, argv: list[str], capsys) -> set[str]:
    """The long options a console tool's --help lists (for tools whose parser is built inside main)."""
    import importlib
    import re

    module, _, func = entry.partition(":")
    with pytest.raises(SystemExit):
        getattr(importlib.import_module(module), func)([*argv, "--help"])
    listed = r"^\s{2}(?:-\w(?: \S+)?, )?(--[a-z][a-z0-9-]+)"  # the options section, not the description
    return set(re.findall(listed, capsys.readouterr().out, re.MULTILINE)) - {"--help"}


def test_every_console_tool_is_classified(capsys):
    """A new console script must join the enumeration: its writers tried below, or listed as writing nothing."""
    import tomllib

    scripts = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    for name, entry in scripts.items():
        tool = "harness-report merge" if name == "harness-report" else name
        assert tool in TOOL_WRITES or tool in NO_OUTPUTS, f"{name}: a new console tool; classify its options here"
        options = _help_options(entry, ["merge"] if name == "harness-report" else [], capsys)
        known = NO_OUTPUTS.get(tool, set()) | TOOL_WRITES.get(tool, set()) | TOOL_READS.get(tool, set())
        assert options <= known, f"{name}: {sorted(options - known)} unclassified"


def _names(parser: argparse.ArgumentParser) -> set[str]:
    names = set()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        longs = [o for o in action.option_strings if o.startswith("--")]
        names.add(longs[0] if longs else action.dest)
    return names


@pytest.mark.parametrize("tool", sorted(TOOL_WRITES))
def test_every_argument_of_every_tool_is_classified(tool):
    names = _names(_parsers()[tool])
    unclassified = names - TOOL_WRITES[tool] - TOOL_READS[tool]
    assert not unclassified, (f"{tool}: {sorted(unclassified)} is new; if it writes, check it with "
                              "harness.cli.check_out_folder (or output_in_golden_problem) and list it in TOOL_WRITES, "
                              "else in TOOL_READS")
    assert not (TOOL_WRITES[tool] | TOOL_READS[tool]) - names  # no stale entry either


def _run_tool(tool: str, args: list[str]) -> int:
    from harness.bench.run import main as bench
    from harness.calibrate.run import main as calibrate
    from harness.diff.cli import main as diff
    from harness.report.merge import main as merge

    try:
        if tool == "harness-report merge":
            return merge(["merge", "results", *args])
        positional = ["m", "m"] if tool == "harness-diff" else []
        return {"harness-bench": bench, "harness-calibrate": calibrate, "harness-diff": diff}[tool]([*positional, *args])
    except SystemExit as exc:  # argparse
        return int(exc.code or 0)


@pytest.mark.parametrize("tool, flag", sorted((t, f) for t, flags in TOOL_WRITES.items() for f in flags))
def test_every_tool_writer_inside_the_golden_folder_is_refused_before_anything_runs(tool, flag, tmp_path,
                                                                                      monkeypatch, capsys):
    (tmp_path / "models.yaml").write_text("default: m\nmodels:\n  m: {path: m}\n")
    golden = tmp_path / "golden/m/cpu/fp16/gen/c.json"
    golden.parent.mkdir(parents=True)
    golden.write_text('{"text": "kept"}\n')
    (tmp_path / "results").mkdir()
    monkeypatch.chdir(tmp_path)
    before = _files(tmp_path / "golden")
    extra = ["--config", "tiny-llama"] if flag == "--work-dir" else []
    for value in ("golden/m/cpu/fp16/gen/c.json", "golden", "golden/m/new"):
        code = _run_tool(tool, [flag, value, *extra])
        err = capsys.readouterr().err
        assert code == 2, (tool, flag, value, err)
        assert f"{flag} {value} is" in err and "golden folder" in err and "Traceback" not in err, err
        assert _files(tmp_path / "golden") == before, (tool, flag, value)
        assert not (tmp_path / "golden/m/new").exists()
