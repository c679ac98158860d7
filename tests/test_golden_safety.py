"""Goldens are read and written only inside the golden folder, atomically, and never lost.

Pure-logic tests of ``GoldenStore`` and its helpers where no model is needed; pytester runs on the
real embedded model where the workflow matters.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

import harness.golden.files
from harness.errors import CheckFailure, GoldenError, SuiteError
from harness.golden import GoldenStore, dumps, meta_path, overlap_problem, tree_report

PROVENANCE = {"model": "m", "device": "cpu", "versions": {"torch": "2"}}
OBSERVED = {"new_token_ids": [1, 2, 3], "prompt_tokens": 4, "text": "abc"}


def store(root: Path, *, update: bool = False, model: str = "m", obtained: Path | None = None) -> GoldenStore:
    return GoldenStore(root=root, model=model, device_class="cpu", update=update, provenance=PROVENANCE,
                       obtained_dir=obtained)


def explain(expected: Any, actual: Any) -> str:
    return f"differs: {expected['text']} -> {actual['text']}"


def record(root: Path, check: str = "c", data: Any = OBSERVED) -> Path:
    goldens = store(root, update=True)
    path = goldens.path(suite="s", check_id=check, variant="fp16")
    goldens.assert_matches(path, data, explain=explain)
    return path


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- never outside the golden folder ------------------------------------------------------------
@pytest.mark.parametrize("model", ["../../escaped", "/tmp/elsewhere", "a/../../b"])
def test_a_model_name_that_leaves_the_golden_folder_is_refused(tmp_path, model):
    goldens = store(tmp_path / "golden", update=True, model=model)
    with pytest.raises(GoldenError, match=r"outside the golden folder .*Goldens are only read and written inside"):
        goldens.path(suite="s", check_id="c", variant="fp16")
    assert list(tmp_path.rglob("*.json")) == []


def test_a_golden_subfolder_symlinked_outside_the_tree_is_not_written_through(tmp_path):
    root, outside = tmp_path / "golden", tmp_path / "outside"
    outside.mkdir()
    (root / "m").mkdir(parents=True)
    (root / "m" / "cpu").symlink_to(outside)
    goldens = store(root, update=True)
    with pytest.raises(GoldenError, match=rf"resolves to {outside}.*Fix: replace the symlink"):
        goldens.assert_matches(root / "m/cpu/fp16/s/c.json", OBSERVED, explain=explain)
    assert list(outside.rglob("*")) == []


def test_a_golden_file_symlinked_outside_the_tree_is_neither_read_nor_replaced(tmp_path):
    root, outside = tmp_path / "golden", tmp_path / "outside.json"
    outside.write_text(dumps(OBSERVED))
    path = root / "m/cpu/fp16/s/c.json"
    path.parent.mkdir(parents=True)
    path.symlink_to(outside)
    for update in (False, True):
        with pytest.raises(GoldenError, match="outside the golden folder"):
            store(root, update=update).assert_matches(path, {**OBSERVED, "text": "new"}, explain=explain)
    assert json.loads(outside.read_text()) == OBSERVED and path.is_symlink()


def test_a_golden_root_that_is_itself_a_symlink_still_works(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "golden").symlink_to(tmp_path / "real")
    path = record(tmp_path / "golden")
    assert json.loads(path.read_text()) == OBSERVED
    assert (tmp_path / "real/m/cpu/fp16/s/c.json").is_file()


@pytest.mark.parametrize("obtained", [".", "golden", "golden/sub", ".."])
def test_obtained_folder_overlapping_the_golden_folder_is_refused(tmp_path, obtained):
    golden = tmp_path / "proj" / "golden"
    golden.mkdir(parents=True)
    problem = overlap_problem(golden, golden / ".." / obtained)
    assert problem is not None and "write what it obtained over the goldens" in problem
    assert overlap_problem(golden, tmp_path / "proj" / "obtained") is None
    assert overlap_problem(golden, tmp_path / "proj" / "golden-obtained") is None


def test_obtained_inside_the_golden_folder_never_rewrites_a_golden(tmp_path):
    root = tmp_path / "golden"
    path = record(root)
    before = files(root)
    goldens = store(root, obtained=root)  # as if the usage check had been bypassed
    with pytest.raises(GoldenError, match="over the goldens"):
        goldens.assert_matches(path, {**OBSERVED, "text": "new"}, explain=explain)
    assert files(root) == before


def test_registry_model_names_must_be_safe_and_unique_whatever_the_case(tmp_path):
    from harness.models.registry import load_registry

    registry = tmp_path / "models.yaml"
    registry.write_text("default: ok\nmodels:\n  ok:\n    path: x\n  ../../escaped:\n    path: y\n")
    with pytest.raises(SuiteError, match=r"models.yaml:6: models\.\.\./\.\./escaped: model name '\.\./\.\./escaped'.*no '/'.*Fix: rename the entry"):
        load_registry(registry)
    registry.write_text("default: ok\nmodels:\n  ok:\n    path: x\n  OK:\n    path: y\n")
    with pytest.raises(SuiteError, match=r"models.yaml:6: models.OK: .*differs from 'ok' only by case"):
        load_registry(registry)


# -- names that collide -------------------------------------------------------------------------
def _suite(tmp_path: Path, checks: str) -> Path:
    path = tmp_path / "suite.yaml"
    path.write_text(f"suite: s\nchecks:\n{checks}")
    return path


def test_a_check_id_ending_in_meta_is_refused_at_collection(tmp_path):
    from harness.suites.spec import load_suite

    path = _suite(tmp_path, "  - {id: x, kind: greedy, prompt: a}\n  - {id: x.META, kind: greedy, prompt: a}\n")
    with pytest.raises(SuiteError, match=r"suite.yaml:4: checks\[1\]\.id: an id ending in '\.meta' .*sidecar of a check 'x'"):
        load_suite(path)


def test_check_ids_that_differ_only_by_case_are_duplicates(tmp_path):
    from harness.suites.spec import load_suite

    path = _suite(tmp_path, "  - {id: Joke, kind: greedy, prompt: a}\n  - {id: joke, kind: greedy, prompt: b}\n")
    with pytest.raises(SuiteError, match=r"duplicate check id 'joke' \(first at line 3\) \('Joke' differs only by case"):
        load_suite(path)


def test_two_suite_files_with_one_suite_name_are_a_collection_error(project):
    (project.path / "suites" / "a").mkdir()
    (project.path / "suites" / "b").mkdir()
    text = "checks:\n  - {id: capital, kind: greedy, prompt: 'The capital of France is', max_new_tokens: 2}\n"
    (project.path / "suites/a/same.yaml").write_text(text)
    (project.path / "suites/b/same.yaml").write_text(text)
    project.suite("named", "suite: SAME\n" + text)
    result = project.run("--co", "-q")
    out = result.stdout.str()
    assert out.count("also used by") == 2, out
    result.stdout.fnmatch_lines([
        "*suites/b/same.yaml: suite: suite name 'same' is also used by *suites/a/same.yaml*"
        "Fix: give one of them its own `suite:` name.",
        "*suites/named.yaml: suite: suite name 'SAME' is also used by *suites/a/same.yaml*",
    ])


# -- how goldens are written ----------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_a_new_golden_gets_the_mode_the_umask_gives(tmp_path, umask):
    old = os.umask(umask)
    try:
        path = record(tmp_path / "golden")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE(meta_path(path).stat().st_mode) == 0o666 & ~umask


def test_a_replaced_golden_keeps_its_mode(tmp_path):
    path = record(tmp_path / "golden")
    path.chmod(0o640)
    goldens = store(tmp_path / "golden", update=True)
    goldens.assert_matches(path, {**OBSERVED, "text": "new"}, explain=explain)
    assert json.loads(path.read_text())["text"] == "new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_the_data_file_is_written_before_its_sidecar_which_names_its_sha256(tmp_path, monkeypatch):
    order: list[str] = []
    real = os.replace
    monkeypatch.setattr(harness.golden.files.os, "replace", lambda src, dst: (order.append(Path(dst).name), real(src, dst)))
    path = record(tmp_path / "golden")
    assert order == ["c.json", "c.meta.json"]
    assert json.loads(meta_path(path).read_text())["golden_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_sidecar_describing_another_version_is_reported_stale_not_trusted(tmp_path):
    root = tmp_path / "golden"
    path = record(root)
    path.write_text(dumps({**OBSERVED, "text": "older"}))  # as after a kill between data and sidecar
    with pytest.raises(CheckFailure) as failure:
        store(root).assert_matches(path, OBSERVED, explain=explain)
    assert "provenance: not shown, the sidecar c.meta.json describes another version of its golden" in str(failure.value)
    report = "\n".join(tree_report(root))
    assert "golden sidecars that cannot be trusted (1)" in report and str(meta_path(path)) in report


def test_leftover_temporary_files_are_reported_and_removed(tmp_path):
    from harness.golden import leftover_temp_files, remove_leftover_temp_files

    root = tmp_path / "golden"
    path = record(root)
    leftover = path.with_name(".c.json.ab12_xyz.tmp")
    leftover.write_text("{")
    unrelated = path.with_name(".notes.tmp")
    unrelated.write_text("mine")
    assert leftover_temp_files(root) == [leftover]
    assert "leftover temporary files in the golden folder (1)" in "\n".join(tree_report(root))
    assert remove_leftover_temp_files(root) == [leftover]
    assert not leftover.exists() and unrelated.exists()
    assert tree_report(root) == []


# -- write failures: a clear message, the previous golden intact ----------------------------------
@pytest.mark.parametrize(("code", "words"), [
    (errno.ENOSPC, "No space left on device.*Fix: free space on that disk"),
    (errno.EROFS, "Read-only file system.*Fix: the file system is read-only"),
    (errno.EACCES, "Permission denied.*Fix: make the golden folder writable"),
    (errno.ENAMETOOLONG, "File name too long.*Fix: shorten the check id"),
])
def test_a_failing_write_names_the_cause_and_keeps_the_previous_golden(tmp_path, monkeypatch, code, words):
    root = tmp_path / "golden"
    path = record(root)
    before = files(root)

    def fail(src: str, dst: str) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(harness.golden.files.os, "replace", fail)
    with pytest.raises(GoldenError, match=rf"Cannot write the golden {path}: {words}") as error:
        store(root, update=True).assert_matches(path, {**OBSERVED, "text": "new"}, explain=explain)
    assert "The previous golden is intact." in str(error.value)
    assert files(root) == before  # no temporary file left either


def test_a_check_id_too_long_for_a_file_name_is_a_clear_error(tmp_path):
    goldens = store(tmp_path / "golden", update=True)
    path = goldens.path(suite="s", check_id="x" * 300, variant="fp16")
    with pytest.raises(GoldenError, match=r"File name too long.*Fix: shorten the check id"):
        goldens.assert_matches(path, OBSERVED, explain=explain)


def test_a_golden_path_that_is_a_folder(tmp_path):
    root = tmp_path / "golden"
    path = root / "m/cpu/fp16/s/c.json"
    path.mkdir(parents=True)
    with pytest.raises(GoldenError, match=r"c.json is a folder, not a file. Fix: move the folder away"):
        store(root).assert_matches(path, OBSERVED, explain=explain)
    with pytest.raises(GoldenError, match=r"Cannot write the golden .*c.json: Is a directory.*Fix: a folder stands where"):
        store(root, update=True).assert_matches(path, OBSERVED, explain=explain)
    assert path.is_dir()


def test_an_exception_midway_through_an_update_loses_no_golden(tmp_path, monkeypatch):
    root = tmp_path / "golden"
    paths = [record(root, check=f"c{i}", data={**OBSERVED, "text": f"old {i}"}) for i in range(5)]
    before = {p: p.read_bytes() for p in paths}
    calls = []
    real = os.replace

    def replace(src: str, dst: str) -> None:
        calls.append(dst)
        if len(calls) == 5:  # the third golden's data file
            raise RuntimeError("boom")
        real(src, dst)

    monkeypatch.setattr(harness.golden.files.os, "replace", replace)
    goldens = store(root, update=True)
    with pytest.raises(RuntimeError):
        for i, path in enumerate(paths):
            goldens.assert_matches(path, {**OBSERVED, "text": f"new {i}"}, explain=explain)
    for i, path in enumerate(paths):
        text = json.loads(path.read_text())["text"]
        assert text == (f"new {i}" if i < 2 else f"old {i}")
        assert path.read_bytes() == before[path] or i < 2
    assert tree_report(root) == []  # no temporary file, no stale sidecar


# -- damaged goldens and sidecars: a message, not a crash -----------------------------------------
@pytest.mark.parametrize(("golden", "words"), [
    ({**OBSERVED, "new_token_ids": "abc"}, "new_token_ids is a JSON str where this check records a list"),
    ({**OBSERVED, "new_token_ids": [1, "2", 3]}, r"new_token_ids\[1\] is a JSON str where this check records a number"),
    ({**OBSERVED, "extra": 1}, "the golden has key 'extra', which this check does not record"),
    ({"text": "abc"}, "the golden lacks key 'new_token_ids'"),
    ([1, 2], "the golden is a JSON list where this check records a dict"),
])
def test_a_golden_of_the_wrong_shape_says_so(tmp_path, golden, words):
    root = tmp_path / "golden"
    path = record(root)
    path.write_text(json.dumps(golden))

    def crash(expected: Any, actual: Any) -> str:
        raise AssertionError("explain must not be called on a damaged golden")

    with pytest.raises(GoldenError, match=rf"{path} does not have the layout this check records: {words}"
                                          r".*Fix: restore it with `git checkout"):
        store(root).assert_matches(path, OBSERVED, explain=crash)


@pytest.mark.parametrize(("sidecar", "words"), [
    ("[1, 2]", "holds a JSON list, not an object"),
    ("{not json", "unreadable"),
    ('{"versions": "x", "device": "cpu"}', "has fields of unexpected types"),
])
def test_a_damaged_sidecar_is_named_and_the_comparison_still_reported(tmp_path, sidecar, words):
    root = tmp_path / "golden"
    path = record(root)
    meta_path(path).write_text(sidecar)
    with pytest.raises(CheckFailure, match=rf"differs: abc -> new\n  provenance: not shown, the sidecar c.meta.json {words}"):
        store(root).assert_matches(path, {**OBSERVED, "text": "new"}, explain=explain)
    store(root, update=True).assert_matches(path, OBSERVED, explain=explain)  # an update repairs it
    assert tree_report(root) == []


# -- workflows on the real model ------------------------------------------------------------------
@pytest.fixture
def recorded(project):
    project.gen_suite(joke=4, capital=3)
    project.record("--variants", "fp16", passed=2)
    return project


def test_obtained_pointing_at_the_golden_folder_is_a_usage_error(recorded, monkeypatch):
    monkeypatch.setenv("CI", "1")
    path = recorded.golden / "smollm2-135m/cpu/fp16/gen/capital.json"
    path.write_text(path.read_text().replace('"max_new_tokens": 3', '"max_new_tokens": 2'))
    before = files(recorded.golden)
    for obtained in ("golden", "golden/smollm2-135m", "."):
        result = recorded.run("--variants", "fp16", "--harness-obtained", obtained)
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines(["*--harness-obtained * the golden folder *: a failing run would write what "
                                     "it obtained over the goldens, and the next run would pass. Fix:*"])
        assert files(recorded.golden) == before
    result = recorded.run("--variants", "fp16", "--harness-obtained", "obtained")
    result.assert_outcomes(passed=1, failed=1)
    assert files(recorded.golden) == before


def test_a_full_disk_during_an_update_fails_that_check_only_and_loses_nothing(recorded):
    before = files(recorded.golden)
    (recorded.path / "conftest.py").write_text(
        "import errno, os, harness.golden.files\n"
        "_real = os.replace\n"
        "def _replace(src, dst):\n"
        "    if 'joke' in str(dst):\n"
        "        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
        "    _real(src, dst)\n"
        "harness.golden.files.os.replace = _replace\n"
    )
    recorded.gen_suite(joke=5, capital=4)  # both goldens change
    result = recorded.run("--variants", "fp16", "--snapshot-update")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([
        "*Cannot write the golden *joke.json: No space left on device (errno 28). The previous golden is "
        "intact. Fix: free space on that disk, then run the update again.",
    ])
    assert "INTERNALERROR" not in result.stdout.str() and "Traceback" not in result.stdout.str()
    after = files(recorded.golden)
    joke = "smollm2-135m/cpu/fp16/gen/joke"
    assert {k: v for k, v in after.items() if joke in k} == {k: v for k, v in before.items() if joke in k}
    assert json.loads(after["smollm2-135m/cpu/fp16/gen/capital.json"])["max_new_tokens"] == 4


def test_a_greedy_golden_with_fields_of_the_wrong_type_is_named_not_a_crash(recorded):
    path = recorded.golden / "smollm2-135m/cpu/fp16/gen/joke.json"
    golden = json.loads(path.read_text())
    golden["new_token_ids"] = "abc"
    path.write_text(json.dumps(golden))
    meta_path(path).write_text("[]")
    result = recorded.run("--variants", "fp16")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([
        f"*Golden file {path.relative_to(recorded.path)} does not have the layout this check records: new_token_ids is a JSON str where "
        "this check records a list. It was edited by hand*",
        f"  {meta_path(path).relative_to(recorded.path)}: holds a JSON list, not an object",
    ])
    assert "INTERNALERROR" not in result.stdout.str()
