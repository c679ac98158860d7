"""``--shard K/N`` and ``harness-report merge``: N jobs run every item once, and their merge is the whole run.

The merge's checks (a missing, crashed, incomplete or foreign shard) run on the result files of a
project of ordinary tests (no model, seconds); one test runs real suites on the embedded model.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

import pytest

from harness.report.merge import main as merge_main
from harness.run.shard import Shard, assign, plain_nodeid, plan

PLAIN_TESTS = {
    "test_a.py": "import pytest\n\n@pytest.mark.parametrize('x', range(3))\ndef test_a(x):\n    pass\n",
    "test_b.py": "def test_b():\n    pass\n",
    "test_c.py": "def test_c1():\n    pass\n\ndef test_c2():\n    pass\n",
    "test_d.py": "def test_d():\n    assert FAIL is False\n",
}


def _run_shards(root: Path, count: int, *extra: str) -> list[subprocess.CompletedProcess[str]]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("CI", None)
    return [
        subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", f"--rootdir={root}",
                        "--shard", f"{k}/{count}", "--harness-result", f"shard-{k}/", *extra],
                       cwd=root, env=env, capture_output=True, text=True, check=False)
        for k in range(1, count + 1)
    ]


@pytest.fixture(scope="module")
def plain_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three shards' results of a project of ordinary tests, all green."""
    root = tmp_path_factory.mktemp("plain")
    (root / "pytest.ini").write_text("[pytest]\n")
    (root / "conftest.py").write_text("import builtins\nbuiltins.FAIL = False\n")
    for name, text in PLAIN_TESTS.items():
        (root / name).write_text(text)
    runs = _run_shards(root, 3)
    assert [r.returncode for r in runs] == [0, 0, 0], [r.stdout + r.stderr for r in runs]
    return root


@pytest.fixture
def shards(plain_shards: Path, tmp_path: Path) -> Path:
    """A copy of the three shards' folders that a test may damage."""
    for k in (1, 2, 3):
        shutil.copytree(plain_shards / f"shard-{k}", tmp_path / f"shard-{k}")
    return tmp_path


def _merge(root: Path, *args: str) -> tuple[int, str]:
    report = root / "merged.md"
    code = merge_main(["merge", *(str(p) for p in sorted(root.glob("shard-*"))), "--report", str(report), *args])
    return code, report.read_text()


def _result(root: Path, k: int) -> Path:
    return next((root / f"shard-{k}").glob("*.json"))


def _edit(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_shards_run_every_item_once_and_merge_green(shards, monkeypatch):
    selected = [json.loads(_result(shards, k).read_text())["plan"]["selected"] for k in (1, 2, 3)]
    everything = sorted(nodeid for part in selected for nodeid in part)
    assert len(everything) == len(set(everything)) == 7
    assert all(part for part in selected)  # four files, three shards: none is empty
    summary = shards / "step-summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    code, report = _merge(shards, "--junitxml", str(shards / "junit.xml"))
    assert code == 0, report
    assert "**result: green**" in report and "## Shards" in report
    assert summary.read_text().strip() == report.strip()
    cases = ET.parse(shards / "junit.xml").getroot().iter("testcase")
    assert sorted(f"{c.get('classname')}::{c.get('name')}" for c in cases) == sorted(
        n.replace(".py::", "::") for n in everything)


def test_a_missing_shard_is_red_and_named(shards):
    shutil.rmtree(shards / "shard-2")
    code, report = _merge(shards)
    assert code == 2
    assert "shard 2/3: no result" in report
    (shards / "shard-2").mkdir()  # the artifact folder exists, empty: the shard crashed before writing
    code, report = _merge(shards)
    assert code == 2 and "shard-2/: no harness result in this folder" in report


def test_shards_of_different_commits_or_goldens_are_red(shards):
    _edit(_result(shards, 3), lambda d: d["identity"].update(commit="0" * 40, goldens="feedbeef"))
    code, report = _merge(shards)
    assert code == 2
    assert re.search(r"different commits \(shard 1/3, 2/3: None; shard 3/3: '0{40}'\)", report), report
    assert "different golden trees" in report


def test_a_crashed_or_incomplete_shard_is_red(shards):
    _edit(_result(shards, 1), lambda d: d.update(complete=False))
    code, report = _merge(shards)
    assert code == 2 and re.search(r"shard 1/3 \(.*\) crashed: it started at", report), report

    shutil.rmtree(shards / "shard-1")
    shutil.copytree(shards / "shard-2", shards / "shard-1")
    _edit(_result(shards, 1), lambda d: d.update(shard={"index": 1, "count": 3}))  # a copy of shard 2's
    code, report = _merge(shards)
    assert code == 2 and "ran in more than one shard" in report and "ran nowhere" in report

    def drop_one(data):
        first = data["plan"]["selected"][0]
        data["reports"] = [r for r in data["reports"] if r.get("nodeid") != first]
    _edit(_result(shards, 2), drop_one)
    code, report = _merge(shards)
    assert code == 2 and re.search(r"shard 2/3 \(.*\) is incomplete: 1 of its \d items have no result", report)


def test_a_shard_that_exited_abnormally_or_twice_is_red(shards):
    _edit(_result(shards, 2), lambda d: d.update(exitstatus=2))
    code, report = _merge(shards)
    assert code == 2 and "ended with exit status 2 (interrupted)" in report
    shutil.copytree(shards / "shard-3", shards / "shard-3-rerun")
    code, report = _merge(shards)
    assert "shard 3/3: 2 results" in report


def test_a_failing_item_makes_the_merge_red(tmp_path):
    root = tmp_path
    (root / "pytest.ini").write_text("[pytest]\n")
    (root / "conftest.py").write_text("import builtins\nbuiltins.FAIL = True\n")
    for name, text in PLAIN_TESTS.items():
        (root / name).write_text(text)
    runs = _run_shards(root, 2)
    assert sorted(r.returncode for r in runs) == [0, 1]
    code, _ = _merge(root, "--junitxml", str(root / "junit.xml"))
    assert code == 1
    failures = [c for c in ET.parse(root / "junit.xml").getroot().iter("testcase") if c.find("failure") is not None]
    assert [c.get("name") for c in failures] == ["test_d"]


def test_not_a_result_file_is_said(tmp_path, capsys):
    (tmp_path / "other.json").write_text("{}")
    assert merge_main(["merge", str(tmp_path / "other.json")]) == 2
    assert "not a harness result" in capsys.readouterr().err


def test_bad_shard_values_are_usage_errors(pytester):
    pytester.makepyfile("def test_x():\n    pass\n")
    for value in ("4/3", "0/2", "two", "1/0"):
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--shard", value)
        assert result.ret == pytest.ExitCode.USAGE_ERROR, value
        result.stderr.fnmatch_lines([f"*--shard {value!r}:*"])


def test_groups_are_dealt_largest_first_deterministically():
    costs = {"fp16": 10, "nf4": 9, "tokenizer": 4, "fp16-lora": 3, "nf4-lora": 3}
    assert assign(costs, 3) == {"fp16": 1, "nf4": 2, "tokenizer": 3, "fp16-lora": 3, "nf4-lora": 3}
    assert assign(dict(reversed(list(costs.items()))), 3) == assign(costs, 3)
    assert set(assign(costs, 8).values()) == {1, 2, 3, 4, 5}  # more shards than groups: some get none
    assert Shard.parse(" 2 / 3 ") == Shard(2, 3)
    assert plain_nodeid("suites/gen.yaml::capital[nf4]@nf4") == "suites/gen.yaml::capital[nf4]"
    assert plain_nodeid("suites/gen.yaml::capital[nf4]") == "suites/gen.yaml::capital[nf4]"


def test_the_plan_splits_whole_groups(tmp_path):
    files = {name: tmp_path / name for name in ("a.py", "b.py", "c.py")}
    for path in files.values():
        path.write_text("")
    items = [SimpleNamespace(nodeid=f"{name}::t{i}", path=path)
             for name, path in files.items() for i in range(3 if name == "a.py" else 1)]
    parts = [plan(items, Shard(k, 2), rootdir=tmp_path) for k in (1, 2)]
    kept = [[item.nodeid for item in part[0]] for part in parts]
    assert kept[0] == ["a.py::t0", "a.py::t1", "a.py::t2"] and kept[1] == ["b.py::t0", "c.py::t0"]
    assert parts[0][2]["collected_digest"] == parts[1][2]["collected_digest"]
    assert parts[0][2]["groups"] == parts[1][2]["groups"]


SUITES = {
    "gen": """
suite: gen
checks:
  - id: capital
    kind: greedy
    prompt: "The capital of France is"
    max_new_tokens: 3
  - id: colours
    kind: greedy
    prompt: "Three primary colours are red,"
    max_new_tokens: 3
""",
    "tok": """
suite: tok
checks:
  - id: words
    kind: tokenization
    texts: ["The capital of France is", "Three primary colours are red,"]
""",
}


def test_three_shards_and_a_merge_reproduce_the_unsharded_run_item_for_item(project, tmp_path):
    """Real suites on the embedded model, fp16 + nf4, one golden changed: the same verdicts, the same diff."""
    for name, text in SUITES.items():
        project.suite(name, text)
    variants = ("--variants", "fp16,nf4")
    project.record(*variants, passed=5)
    golden = project.golden / "smollm2-135m" / "tokenizer" / "tok" / "words.json"
    data = json.loads(golden.read_text())
    data["texts"][0]["ids"][1] += 1  # a tokenizer regression the goldens must catch
    golden.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

    whole = project.run(*variants, "--harness-result", str(tmp_path / "whole" / "result.json"))
    whole.assert_outcomes(passed=4, failed=1)
    for k in (1, 2, 3):
        shard = project.run(*variants, "--shard", f"{k}/3", "--harness-result", str(tmp_path / f"shard-{k}") + "/")
        assert shard.ret in (0, 1)
        # one load group per shard: each loads at most one variant, once
        assert len(re.findall(r"^loaded (\S+): 1x", shard.stdout.str(), re.MULTILINE)) <= 1

    code_whole = merge_main(["merge", str(tmp_path / "whole"), "--report", str(tmp_path / "whole.md")])
    code = merge_main(["merge", *(str(tmp_path / f"shard-{k}") for k in (1, 2, 3)),
                       "--report", str(tmp_path / "merged.md"), "--junitxml", str(tmp_path / "merged.xml")])
    assert code == code_whole == 1
    verdicts = {}
    for name in ("whole", "merged"):
        items = []
        for file in (tmp_path / name).rglob("*.json") if name == "whole" else tmp_path.glob("shard-*/*.json"):
            items += json.loads(file.read_text())["items"]
        verdicts[name] = {item["nodeid"]: (item["outcome"], item["reason"]) for item in items}
    assert verdicts["merged"] == verdicts["whole"]
    assert len(verdicts["whole"]) == 5
    assert verdicts["whole"]["suites/tok.yaml::words"][0] == "failed"
    merged = (tmp_path / "merged.md").read_text()
    assert "**result: red**" in merged and "### suites/tok.yaml::words" in merged
    failure = merged.split("### suites/tok.yaml::words")[1]
    assert failure.split("```")[1] == (tmp_path / "whole.md").read_text().split("### suites/tok.yaml::words")[1].split("```")[1]
    assert "| 1/3 |" in merged and "| 3/3 |" in merged


def test_shards_under_xdist_record_their_plan_and_merge(tmp_path):
    """The controller collects nothing: the plan comes from the workers, the reports from the controller."""
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "conftest.py").write_text("import builtins\nbuiltins.FAIL = False\n")
    for name, text in PLAIN_TESTS.items():
        (tmp_path / name).write_text(text)
    runs = _run_shards(tmp_path, 2, "-n", "2", "--dist", "loadgroup")
    assert [r.returncode for r in runs] == [0, 0], [r.stdout + r.stderr for r in runs]
    plans = [json.loads(_result(tmp_path, k).read_text())["plan"] for k in (1, 2)]
    assert sum(len(p["selected"]) for p in plans) == plans[0]["collected"] == 7
    code, report = _merge(tmp_path)
    assert code == 0, report
