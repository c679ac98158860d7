"""Bad input, ``harness-report merge``: a result file is input, validated before it is trusted (one paragraph,
exit 2, nothing written), and a merged gate verdict is never greener than a single gate session's.

The shards are those of a project of ordinary tests (no model, seconds); a NOT JUDGED check is a check the
session lists as unselected (its ``variants:`` matched none), which the gate treats like any unjudged item.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness.report.merge import main as merge_main
from harness.report.result import read_result, schema_problem

TESTS = {"test_a.py": "def test_a1():\n    pass\n\ndef test_a2():\n    pass\n",
         "test_b.py": "def test_b():\n    pass\n"}
UNJUDGED = "suites/gen.yaml::capital: its variants: [nf4] matched none of this session's variants"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two green shards run without CI."""
    root = tmp_path_factory.mktemp("merge")
    (root / "pytest.ini").write_text("[pytest]\n")
    for name, text in TESTS.items():
        (root / name).write_text(text)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("CI", None)
    for k in (1, 2):
        run = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", f"--rootdir={root}",
                              "--shard", f"{k}/2", "--harness-result", f"shard-{k}/"],
                             cwd=root, env=env, capture_output=True, text=True, check=False)
        assert run.returncode == 0, run.stdout + run.stderr
    return root


@pytest.fixture
def shards(built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    for k in (1, 2):
        shutil.copytree(built / f"shard-{k}", tmp_path / f"shard-{k}")
    return tmp_path


def _file(root: Path, k: int) -> Path:
    return next((root / f"shard-{k}").glob("*.json"))


def _edit(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _merge(root: Path, capsys, *args: str) -> tuple[int, str, str]:
    report = root / "merged.md"
    code = merge_main(["merge", str(root / "shard-1"), str(root / "shard-2"), "--report", str(report), *args])
    out = capsys.readouterr()
    return code, report.read_text() if report.exists() else "", out.out + out.err


def test_the_untouched_shards_are_valid_and_merge_green(shards, capsys):
    assert schema_problem(json.loads(_file(shards, 1).read_text())) is None
    assert read_result(_file(shards, 1)).identity["ci"] is False
    code, report, _ = _merge(shards, capsys)
    assert code == 0 and "**result: green**" in report


def _set(path: str, value):
    keys = path.split(".")

    def change(data):
        node = data
        for key in keys[:-1]:
            node = node[int(key)] if isinstance(node, list) else node[key]
        last = keys[-1]
        if value is _DELETE:
            del node[last]
        elif isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return change


_DELETE = object()


@pytest.mark.parametrize("path, value, said", [
    pytest.param("shard", "2/2", "shard is '2/2': '2/2' is not of type 'object'", id="example: shard as a string"),
    pytest.param("shard.index", 0, "shard.index is 0", id="shard index 0"),
    pytest.param("shard.count", 10 ** 20, "shard.count is 100000000000000000000", id="a huge shard count"),
    pytest.param("shard.index", "1", "shard.index is '1'", id="shard index as text"),
    pytest.param("complete", "yes", "complete is 'yes'", id="complete as text"),
    pytest.param("exitstatus", "0", "exitstatus is '0'", id="exit status as text"),
    pytest.param("plan.selected", "test_a.py::test_a1", "plan.selected is", id="selected items not a list"),
    pytest.param("plan.collected", -3, "plan.collected is -3", id="a negative collection"),
    pytest.param("plan", _DELETE, "lacks a field: 'plan'", id="a finished shard without its plan"),
    pytest.param("reports.0", "passed", "reports[0] is 'passed'", id="a report that is not an object"),
    pytest.param("reports.0.$report_type", "Other", "reports[0].$report_type is 'Other'", id="unknown report type"),
    pytest.param("header.model.provenance", ["x"], "header.model.provenance is ['x']", id="provenance as a list"),
    pytest.param("header.model.colour", "red", "header.model", id="an unknown header field"),
    pytest.param("loads.x", {"gpu9": {"count": 1, "seconds": 1, "bytes": 1}}, "loads.x", id="unknown variant"),
    pytest.param("seconds", "fast", "seconds is 'fast'", id="seconds as text"),
    pytest.param("identity.commit", 5, "identity.commit is 5", id="a commit as a number"),
    pytest.param("identity.ci", "true", "identity.ci is 'true'", id="the gate mode as text"),
    pytest.param("unselected", [1], "unselected[0] is 1", id="an unselected note that is not text"),
    pytest.param("version", True, "", id="version true (equal to 1 in Python)"),
])
def test_a_malformed_result_is_refused_in_one_paragraph_with_exit_2(shards, capsys, path, value, said):
    _edit(_file(shards, 2), _set(path, value))
    code, report, out = _merge(shards, capsys)
    assert code == 2, out
    assert "Traceback" not in out and "AttributeError" not in out
    line = next(line for line in out.splitlines() if str(_file(shards, 2)) in line)
    assert said in line and ("not a valid harness result" in line or "format version" in line), line
    assert "**result: red**" in report or "do not make one whole run" in report


def test_shards_of_two_gate_modes_are_not_one_run(shards, capsys):
    """Example: shard 1 run outside CI (its NOT JUDGED check only warned) and shard 2 as a gate."""
    _edit(_file(shards, 1), _set("unselected", [UNJUDGED]))
    _edit(_file(shards, 2), _set("identity.ci", True))
    code, report, out = _merge(shards, capsys)
    assert code == 2, out
    assert "the shards ran on different gate modes" in out and "shard 1/2: False; shard 2/2: True" in out


def test_a_merge_under_ci_applies_the_gate_rule_to_what_no_shard_judged(shards, capsys, monkeypatch):
    _edit(_file(shards, 1), _set("unselected", [UNJUDGED]))
    code, report, _ = _merge(shards, capsys)
    assert code == 0  # outside CI an unjudged check warns, as in a single session
    monkeypatch.setenv("CI", "true")
    code, report, _ = _merge(shards, capsys)
    assert code == 1 and "**result: red**" in report
    assert "## Not judged (this gate run failed because of them)" in report and UNJUDGED in report


def test_gate_shards_merged_outside_ci_keep_the_gate_rule(shards, capsys):
    for k in (1, 2):
        _edit(_file(shards, k), _set("identity.ci", True))
    _edit(_file(shards, 2), _set("unselected", [UNJUDGED]))
    code, report, _ = _merge(shards, capsys)
    assert code == 1 and "this gate run failed because of them" in report


def test_a_result_written_before_the_mode_joined_the_identity_reads_it_from_the_result(shards):
    _edit(_file(shards, 1), lambda data: data["identity"].pop("ci"))
    assert read_result(_file(shards, 1)).identity["ci"] is False


@pytest.mark.parametrize("flag", ["--report", "--junitxml"])
def test_merge_outputs_inside_the_golden_folder_are_refused_before_anything_is_read(shards, capsys, monkeypatch, flag):
    """Example: --report naming a golden file overwrote it."""
    golden = shards / "golden/m/cpu/fp16/gen/c.json"
    golden.parent.mkdir(parents=True)
    golden.write_text('{"text": "kept"}\n')
    monkeypatch.chdir(shards)
    for value, extra in ((str(golden.relative_to(shards)), []), ("golden", []),
                         ("elsewhere/out", ["--golden-dir", "elsewhere"])):
        (shards / "elsewhere").mkdir(exist_ok=True)
        code = merge_main(["merge", "shard-1", "shard-2", flag, value, *extra])
        err = capsys.readouterr().err
        assert code == 2, err
        assert f"{flag} {value} is" in err and "golden folder" in err and "Traceback" not in err
    assert golden.read_text() == '{"text": "kept"}\n' and not (shards / "elsewhere/out").exists()


def test_a_merge_usage_error_is_one_paragraph(capsys):
    with pytest.raises(SystemExit) as info:
        merge_main(["merge"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Fix: see harness-report merge --help" in err
