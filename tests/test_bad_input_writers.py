"""Bad input, writers: nothing but ``--snapshot-update`` writes into the golden folder, one suite file owns a
suite name's goldens across runs, and a gate run does not judge against a golden its sidecar does not vouch for.

Examples found by trying the harness from outside are marked "example"; the other cases are invented ones of the same classes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from harness.errors import GoldenError
from harness.golden import GoldenStore, meta_path, remove_orphan_sidecars, trust_problem
from harness.report.outputs import LazyBinaryFile, output_in_golden_problem, strict_json

GOLDEN = "golden/smollm2-135m/cpu/fp16/gen/capital.json"
TOKENIZER_SUITE = """
suite: words
checks:
  - id: words
    kind: tokenization
    texts: ["The capital of France is", "Hello!"]
"""


def _files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def with_golden(project):
    """A project with one golden on disk (no run needed: the options are refused before anything runs)."""
    project.suite("gen", "checks:\n  - {id: capital, kind: greedy, prompt: 'The capital of France is'}\n")
    golden = project.path / GOLDEN
    golden.parent.mkdir(parents=True)
    golden.write_text('{"format": 2, "text": " Paris"}\n')
    meta_path(golden).write_text("{}\n")
    return project


# -- every writer stays out of the golden folder ------------------------------------------------------
@pytest.mark.parametrize("args", [
    pytest.param(["--harness-report", GOLDEN], id="example: --harness-report naming a golden"),
    pytest.param(["--benchmark-json", GOLDEN], id="example: --benchmark-json naming a golden (truncated at parse)"),
    pytest.param(["--junitxml", "golden/junit.xml"], id="--junitxml inside the golden folder"),
    pytest.param(["--benchmark-histogram", "golden/smollm2-135m/hist"], id="--benchmark-histogram prefix inside"),
    pytest.param(["--benchmark-save", "run", "--benchmark-storage", "file://golden/bench"],
                 id="--benchmark-storage inside, with --benchmark-save"),
    pytest.param(["--golden-dir", "sub/golden", "--basetemp", "sub"],
                 id="--basetemp containing the golden folder (pytest empties it)"),
    pytest.param(["--basetemp", "golden/tmp"], id="--basetemp inside the golden folder"),
    pytest.param(["--harness-report", "golden/report.md"], id="--harness-report as a new file in the golden folder"),
])
def test_an_output_path_in_the_golden_folder_is_refused_before_anything_runs(with_golden, args):
    before = _files(with_golden.golden)
    result = with_golden.run("--variants", "fp16", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str() + result.stderr.str()
    text = result.stderr.str()
    assert f"{args[-1] if args[0] != '--benchmark-save' else 'golden/bench'}" in text
    assert ("inside the golden folder" in text or "contains the golden folder" in text) and "Nothing was run" in text
    assert "Traceback" not in text + result.stdout.str()
    assert _files(with_golden.golden) == before  # not truncated, not added to


def test_benchmark_json_opens_its_file_only_when_written():
    """The stand-in for argparse.FileType('wb'): nothing is created or truncated until pytest-benchmark writes."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        target = Path(folder) / "bench.json"
        target.write_text("previous")
        lazy = LazyBinaryFile(str(target))
        assert target.read_text() == "previous" and str(lazy) == str(target)
        with lazy as fh:
            fh.write(b'{"ok": true}')
        assert json.loads(target.read_text()) == {"ok": True}


def test_output_paths_are_judged_after_symlinks(tmp_path):
    golden = tmp_path / "golden"
    golden.mkdir()
    (tmp_path / "reports").symlink_to(golden)
    assert "inside the golden folder" in output_in_golden_problem("--harness-report", tmp_path / "reports/r.md", golden)
    assert output_in_golden_problem("--harness-report", tmp_path / "r.md", golden) is None
    assert output_in_golden_problem("--basetemp", tmp_path / "other", golden, erases=True) is None
    assert "contains the golden folder" in output_in_golden_problem("--basetemp", tmp_path, golden, erases=True)


@pytest.mark.parametrize("tool", ["harness-diff", "harness-calibrate", "harness-bench"])
def test_out_of_a_tool_inside_the_golden_folder_is_refused_before_a_model_loads(tool, tmp_path, monkeypatch, capsys):
    (tmp_path / "models.yaml").write_text("default: m\nmodels:\n  m: {path: m}\n")
    (tmp_path / "golden/m").mkdir(parents=True)
    (tmp_path / "mine").mkdir()
    monkeypatch.chdir(tmp_path)
    for out, golden_dir in (("golden/m/report", None), ("mine/out", "mine")):
        args = ["--out", out] + (["--golden-dir", golden_dir] if golden_dir else [])
        assert _tool(tool)([*_positional(tool), *args]) == 2
        err = capsys.readouterr().err
        assert f"--out {out} is inside the golden folder" in err and "Traceback" not in err
    assert not (tmp_path / "golden/m/report").exists() and not (tmp_path / "mine/out").exists()


def _tool(tool: str):
    from harness.bench.run import main as bench
    from harness.calibrate.run import main as calibrate
    from harness.diff.cli import main as diff

    return {"harness-diff": diff, "harness-calibrate": calibrate, "harness-bench": bench}[tool]


def _positional(tool: str) -> list[str]:
    return ["m", "m"] if tool == "harness-diff" else []


# -- one suite file owns a suite name's goldens, across runs ------------------------------------------
PROVENANCE = {"model": "m", "device": "cpu", "versions": {}}


def _store(root: Path, rootdir: Path, *, update: bool, gate: bool = False) -> GoldenStore:
    return GoldenStore(root=root, model="m", device_class="cpu", update=update, provenance=PROVENANCE,
                       rootdir=rootdir, gate=gate)


def _record(rootdir: Path, suite_file: str, data: object, *, update: bool = True, check: str = "c") -> Path:
    store = _store(rootdir / "golden", rootdir, update=update)
    path = store.path(suite="gen", check_id=check, variant="fp16")
    store.assert_matches(path, data, explain=lambda e, a: "differs", owner=rootdir / suite_file)
    return path


def test_example_a_second_suite_file_with_the_same_name_does_not_rewrite_the_firsts_goldens(tmp_path):
    for name in ("a.yaml", "b.yaml"):
        (tmp_path / "suites").mkdir(exist_ok=True)
        (tmp_path / "suites" / name).write_text("suite: gen\nchecks: []\n")
    path = _record(tmp_path, "suites/a.yaml", {"text": "from a"})
    assert json.loads(meta_path(path).read_text())["suite_file"] == "suites/a.yaml"
    before = path.read_bytes()
    for update in (True, False):  # updating would rewrite a's goldens; judging would compare b with them
        with pytest.raises(GoldenError, match=r"belongs to suite file suites/a.yaml .* suites/b.yaml declares the "
                                              r"same suite name 'gen'.*Fix: give one of the two files its own"):
            _record(tmp_path, "suites/b.yaml", {"text": "from b"}, update=update, check="other")
    assert path.read_bytes() == before


def test_example_two_suite_files_updated_in_separate_runs(project):
    project.suite("a", TOKENIZER_SUITE)
    project.suite("b", TOKENIZER_SUITE.replace("texts: [", "texts: [Bonjour, "))
    project.record("suites/a.yaml", passed=1)
    before = _files(project.golden)
    result = project.run("suites/b.yaml", "--snapshot-update")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*belongs to suite file suites/a.yaml (its sidecar words.meta.json records it), "
                                 "and suites/b.yaml declares the same suite name 'words'*"])
    assert _files(project.golden) == before


def test_a_suite_file_that_was_renamed_takes_its_goldens_over(tmp_path):
    (tmp_path / "suites").mkdir()
    (tmp_path / "suites/a.yaml").write_text("suite: gen\nchecks: []\n")
    path = _record(tmp_path, "suites/a.yaml", {"text": "x"})
    (tmp_path / "suites/a.yaml").rename(tmp_path / "suites/b.yaml")  # git mv
    _record(tmp_path, "suites/b.yaml", {"text": "x"}, update=False)  # judged, no error
    _record(tmp_path, "suites/b.yaml", {"text": "x"})  # and an update records the new owner
    assert json.loads(meta_path(path).read_text())["suite_file"] == "suites/b.yaml"


def test_a_first_owner_that_now_declares_another_name_releases_the_folder(tmp_path):
    (tmp_path / "suites").mkdir()
    (tmp_path / "suites/a.yaml").write_text("suite: gen\nchecks: []\n")
    _record(tmp_path, "suites/a.yaml", {"text": "x"})
    (tmp_path / "suites/a.yaml").write_text("suite: other-name\nchecks: []\n")
    _record(tmp_path, "suites/b.yaml", {"text": "y"}, check="d")


# -- a gate run judges only against goldens their sidecars vouch for -----------------------------------
def test_example_a_golden_replaced_by_an_obtained_file_fails_a_gate_run(tmp_path):
    path = _record(tmp_path, "suites/a.yaml", {"text": "good"})
    obtained = {"text": "broken"}
    path.write_text(json.dumps(obtained, indent=2, sort_keys=True) + "\n")  # cp obtained/... golden/...
    gate = _store(tmp_path / "golden", tmp_path, update=False, gate=True)
    with pytest.raises(GoldenError, match=r"not vouched for, so this gate run does not judge against it: its sidecar "
                                          r"c.meta.json describes another version of its golden"):
        gate.assert_matches(path, obtained, explain=lambda e, a: "", owner=tmp_path / "suites/a.yaml")
    # outside a gate the comparison is made (and the terminal and report list the sidecar)
    _store(tmp_path / "golden", tmp_path, update=False).assert_matches(path, obtained, explain=lambda e, a: "")


def test_a_golden_without_a_sidecar_fails_a_gate_run(tmp_path):
    path = _record(tmp_path, "suites/a.yaml", {"text": "good"})
    meta_path(path).unlink()
    assert "has no sidecar" in trust_problem(path)
    with pytest.raises(GoldenError, match="has no sidecar"):
        _store(tmp_path / "golden", tmp_path, update=False, gate=True).assert_matches(
            path, {"text": "good"}, explain=lambda e, a: "")


def test_a_tampered_golden_fails_the_gate_and_the_report_says_red(project, monkeypatch):
    project.suite("words", TOKENIZER_SUITE)
    project.run("--snapshot-update").assert_outcomes(passed=1)
    golden = project.golden / "smollm2-135m/tokenizer/words/words.json"
    data = json.loads(golden.read_text())
    golden.write_text(json.dumps(data, indent=1))  # same content, other bytes: not what the sidecar vouches for
    monkeypatch.setenv("CI", "true")
    result = project.run("--harness-report", "report.md")
    result.assert_outcomes(failed=1)
    report = (project.path / "report.md").read_text()
    assert "**result: red**" in report and "not vouched for" in report
    assert "## Golden folder" in report and "describes another version of its golden" in report


def test_example_an_orphan_sidecar_is_removed_by_the_update_its_message_promises(project):
    project.suite("words", TOKENIZER_SUITE)
    project.run("--snapshot-update").assert_outcomes(passed=1)
    orphan = project.golden / "smollm2-135m/tokenizer/words/gone.meta.json"
    orphan.write_text("{}")
    result = project.run()
    result.stdout.fnmatch_lines([f"  {orphan.relative_to(project.path)}: its golden file does not exist"])
    result = project.run("--snapshot-update")
    result.stdout.fnmatch_lines(["removed 1 sidecars whose golden file does not exist from the golden folder"])
    assert not orphan.exists()
    assert "cannot be trusted" not in project.run().stdout.str()


def test_orphan_sidecars_only_are_removed(tmp_path):
    path = _record(tmp_path, "suites/a.yaml", {"text": "x"})
    orphan = path.with_name("gone.meta.json")
    orphan.write_text("{}")
    assert remove_orphan_sidecars(tmp_path / "golden") == [orphan]
    assert meta_path(path).exists() and path.exists()


def test_json_written_by_the_tools_is_strict():
    text = strict_json({"kl": float("nan"), "rows": [float("inf"), 1.5]})
    assert json.loads(text) == {"kl": None, "rows": [None, 1.5]} and "NaN" not in text
