"""A verdict you can trust: no hidden crash, no silent green, checks not judged are never quiet."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.run.ci import in_ci
from harness.errors import GoldenError
from harness.golden import GoldenStore
from harness.run.session import golden_folder_name

TOKENS = """
suite: tok
checks:
  - id: boom
    kind: tokenization
    texts: ["boom"]
  - id: fine
    kind: tokenization
    texts: ["fine"]
  - id: nf4-only
    kind: greedy
    prompt: "The capital of France is"
    max_new_tokens: 2
    variants: [nf4]
"""

# an unexpected exception (not a CheckFailure or HarnessError) inside one check
BOOM = """
import harness.checks.tokenization as tok

_run = tok.TokenizationCheck.run

def run(self, ctx):
    if self.spec.id == "boom":
        raise RuntimeError("the real error, xyzzy")
    return _run(self, ctx)

tok.TokenizationCheck.run = run
"""


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["one-process", "xdist"])
def test_an_unexpected_exception_is_that_items_failure_and_the_session_goes_on(project, workers):
    project.suite("tok", TOKENS)
    (project.path / "conftest.py").write_text(BOOM)
    result = project.run("--variants", "fp16", "--snapshot-update", *workers)
    out = result.stdout.str() + result.stderr.str()
    assert "INTERNALERROR" not in out
    assert "no active workers" not in out
    result.assert_outcomes(failed=1, passed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines([
        "*tok.yaml:4: boom",
        "*unexpected RuntimeError: the real error, xyzzy (a harness bug, or an input the harness does not validate yet*",
        "*conftest.py:8: RuntimeError",  # the traceback reaches the line that raised
    ])
    # the check that no session variant runs is said out loud (from the workers too, under xdist)
    result.stdout.fnmatch_lines([
        "*harness: WARNING 1 check(s) NOT JUDGED*",
        "*tok.yaml:10: nf4-only: its variants (nf4) are none of this session's (fp16)*",
    ])


def test_without_pytest_xdist_the_main_job_runs(project):
    """README's main job installs no dev extra: pytest-xdist's hooks must be optional."""
    project.suite("tok", TOKENS.split("  - id: nf4-only")[0])
    result = project.run("-p", "no:xdist", "--snapshot-update")
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
    result.assert_outcomes(passed=2)


BROKEN_TEMPLATE = "{% for m in messages %}{{ m.content }"


def test_a_chat_template_that_does_not_parse_fails_chat_checks_with_its_problem(project, editable_model):
    model = editable_model("broken-template")
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = BROKEN_TEMPLATE
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    (model / "chat_template.jinja").unlink(missing_ok=True)
    project.gen_suite(joke=2, capital=2)
    result = project.run("--model", str(model), "--variants", "fp16", "--snapshot-update")
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines([
        "*gen.yaml:*: joke[[]fp16[]]",
        "*the model's chat template cannot render these messages*TemplateSyntaxError*"
        "Fix: correct chat_template in the model's tokenizer_config.json*",
    ])
    assert "a harness bug" not in result.stdout.str()


# -- gate runs: never green on checks that were not judged -------------------------------------

NOT_JUDGED = """
import harness.models.pool
harness.models.pool.nf4_unsupported_reason = lambda device: "simulated: bitsandbytes is installed but broken"
"""

CAPITAL = """
suite: gen
checks:
  - id: capital
    kind: greedy
    prompt: "The capital of France is"
    max_new_tokens: 2
"""


def test_a_variant_with_goldens_that_cannot_load_fails_a_gate_run(project, monkeypatch):
    project.suite("gen", CAPITAL)
    project.record("--variants", "fp16,nf4", passed=2)
    (project.path / "conftest.py").write_text(NOT_JUDGED)

    local = project.run("--variants", "fp16,nf4")
    local.assert_outcomes(passed=1, skipped=1)
    assert local.ret == pytest.ExitCode.OK
    local.stdout.fnmatch_lines([
        "*harness: WARNING 1 check(s) NOT JUDGED*",
        "*gen.yaml::capital[[]nf4[]]: NF4 is not available on *simulated: bitsandbytes is installed but broken; "
        "but goldens for nf4 on this device class exist*",
    ])

    monkeypatch.setenv("CI", "true")
    report = project.path / "out" / "report.md"
    gate = project.run("--variants", "fp16,nf4", "--harness-report", str(report))
    gate.assert_outcomes(passed=1, skipped=1)
    assert gate.ret == pytest.ExitCode.TESTS_FAILED
    gate.stdout.fnmatch_lines(["*harness: 1 check(s) NOT JUDGED - this gate run fails*"])
    text = report.read_text()
    assert "**result: red**" in text
    assert "## Not judged (this gate run failed because of them)" in text


def test_a_platform_skip_without_goldens_keeps_a_gate_run_green(project, monkeypatch):
    project.suite("gen", CAPITAL)
    project.record("--variants", "fp16", passed=1)
    (project.path / "conftest.py").write_text(NOT_JUDGED)
    monkeypatch.setenv("CI", "1")
    result = project.run("--variants", "fp16,nf4")
    result.assert_outcomes(passed=1, skipped=1)
    assert result.ret == pytest.ExitCode.OK
    assert "NOT JUDGED" not in result.stdout.str()


RAISES_NOT_JUDGED = """
import harness.checks.tokenization as tok
from harness.errors import NotJudged

def run(self, ctx):
    raise NotJudged("the budget could not be measured here")

tok.TokenizationCheck.run = run
"""


@pytest.mark.parametrize("ci", ["1", "false"])
def test_a_check_raising_not_judged_fails_only_a_gate_run(project, monkeypatch, ci):
    project.suite("tok", TOKENS.split("  - id: fine")[0])
    (project.path / "conftest.py").write_text(RAISES_NOT_JUDGED)
    monkeypatch.setenv("CI", ci)
    result = project.run()
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*tok.yaml::boom: the budget could not be measured here*"])
    assert result.ret == (pytest.ExitCode.TESTS_FAILED if ci == "1" else pytest.ExitCode.OK)


def test_a_check_whose_variants_are_not_in_the_session_fails_a_gate_run(project, monkeypatch):
    project.suite("tok", TOKENS.replace("  - id: boom\n    kind: tokenization\n    texts: [\"boom\"]\n", ""))
    project.record("--variants", "fp16", passed=1)
    monkeypatch.setenv("CI", "true")
    result = project.run("--variants", "fp16")
    result.assert_outcomes(passed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines([
        "*harness: 1 check(s) NOT JUDGED - this gate run fails*",
        "*nf4-only: its variants (nf4) are none of this session's (fp16)*",
    ])


# -- the report: a folder is refused at start; a failed write neither hides nor flips the verdict --

def test_harness_report_that_is_a_folder_is_a_usage_error(project):
    (project.path / "reports").mkdir()
    result = project.run("--harness-report", "reports", "--collect-only")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--harness-report reports: this is a folder. Fix: pass a file name*"])


DISK_FULL = """
import errno
import harness.report.markdown

def markdown(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

harness.report.markdown.markdown = markdown
"""


@pytest.mark.parametrize("outcome", ["green", "red"])
def test_a_report_that_cannot_be_written_keeps_the_verdict_and_the_failures(project, outcome):
    project.suite("tok", TOKENS.split("  - id: fine")[0])
    project.run("--snapshot-update").assert_outcomes(passed=1)
    if outcome == "red":
        golden = project.golden / "smollm2-135m/tokenizer/tok/boom.json"
        golden.write_text(golden.read_text().replace("boom", "bang"))
    (project.path / "conftest.py").write_text(DISK_FULL)
    result = project.run("--harness-report", "report.md")
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
    result.stdout.fnmatch_lines(["*harness: --harness-report report.md could not be written: OSError*No space left*"])
    if outcome == "green":
        result.assert_outcomes(passed=1)
        assert result.ret == pytest.ExitCode.OK
    else:
        result.assert_outcomes(failed=1)
        assert result.ret == pytest.ExitCode.TESTS_FAILED
        result.stdout.fnmatch_lines(["*= FAILURES =*", "*tok.yaml:4: boom*"])


# -- CI, collection, names ---------------------------------------------------------------------

@pytest.mark.parametrize(("value", "expected"), [
    (None, False), ("", False), ("0", False), ("false", False), ("False", False), ("no", False),
    ("1", True), ("true", True), ("yes", True), ("woodpecker", True),
])
def test_ci_false_and_zero_are_not_ci(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    assert in_ci() is expected


@pytest.mark.parametrize(("value", "refused"), [("false", False), ("0", False), ("true", True)])
def test_snapshot_update_is_refused_only_when_ci_is_really_set(project, monkeypatch, value, refused):
    project.suite("tok", TOKENS)
    monkeypatch.setenv("CI", value)
    result = project.run("--snapshot-update", "--collect-only", "-q")
    assert (result.ret == pytest.ExitCode.USAGE_ERROR) is refused
    assert ("--snapshot-update refused" in result.stderr.str()) is refused


def test_yaml_outside_suites_is_a_suite_only_when_named_or_opted_in(project):
    project.suite("tok", TOKENS)
    (project.path / ".codeclimate.yml").write_text("version: '2'\nchecks:\n  method-lines:\n    enabled: true\n")
    (project.path / "behaviour").mkdir()
    (project.path / "behaviour" / "extra.yaml").write_text(TOKENS.replace("suite: tok", "suite: extra"))
    result = project.run(".", "--collect-only", "-q", "--variants", "fp16")
    assert result.ret == pytest.ExitCode.OK
    out = result.stdout.str()
    assert "codeclimate" not in out
    assert "behaviour/extra.yaml" not in out
    assert "suites/tok.yaml::boom" in out

    named = project.run("behaviour/extra.yaml", "--collect-only", "-q", "--variants", "fp16")
    named.stdout.fnmatch_lines(["behaviour/extra.yaml::boom"])
    folder = project.run("behaviour", "--collect-only", "-q", "--variants", "fp16")
    folder.stdout.fnmatch_lines(["behaviour/extra.yaml::boom"])

    (project.path / "pytest.ini").write_text("[pytest]\nharness_suites = behaviour/*.yaml\n")
    opted = project.run(".", "--collect-only", "-q", "--variants", "fp16")
    opted.stdout.fnmatch_lines(["behaviour/extra.yaml::boom"])
    assert "codeclimate" not in opted.stdout.str()


@pytest.mark.parametrize("how", ["option", "default"])
def test_a_registry_that_is_a_folder_is_one_usage_error(project, how):
    project.suite("a", TOKENS)
    project.suite("b", TOKENS.replace("suite: tok", "suite: tok2"))
    if how == "option":
        args = ["--registry", "fixtures"]
    else:
        (project.path / "models.yaml").unlink()
        (project.path / "models.yaml").mkdir()
        args = []
    result = project.run(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    err = result.stderr.str()
    assert err.count("this is a folder; the registry is one YAML file") == 1, err
    assert "Fix: pass the file" in err


def test_suites_without_a_registry_are_one_usage_error(project):
    project.suite("a", TOKENS)
    project.suite("b", TOKENS.replace("suite: tok", "suite: tok2"))
    (project.path / "models.yaml").unlink()
    result = project.run()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    err = result.stderr.str()
    assert err.count("does not exist. Fix: pass --registry FILE, or create models.yaml") == 1, err
    assert "2 suite file(s) found" in err
    assert "ERROR collecting" not in result.stdout.str()


def test_unsafe_model_names_get_their_own_golden_folder():
    names = {golden_folder_name(n) for n in ("my model", "my@model", "my-model", "my/model", "../../escaped")}
    assert len(names) == 5
    assert golden_folder_name("my-model") == "my-model"  # a safe name is kept as it is
    for name in names:
        assert "/" not in name and not name.startswith(".")
        assert len(name) <= 80
    assert golden_folder_name("x" * 300) != golden_folder_name("x" * 301)


def test_a_users_own_variant_parameter_is_left_alone(project):
    (project.path / "test_own.py").write_text(
        "import pytest\n\n"
        "@pytest.mark.parametrize('variant', ['a', 'b'])\n"
        "def test_mine(variant):\n"
        "    assert variant in 'ab'\n"
    )
    result = project.run("test_own.py")
    result.assert_outcomes(passed=2)


# -- goldens that do not have the shape the check records --------------------------------------

def _store(tmp_path: Path) -> GoldenStore:
    return GoldenStore(root=tmp_path, model="m", device_class="cpu", update=False, provenance={})


def test_a_golden_with_an_extra_key_fails_with_a_reason(tmp_path):
    store = _store(tmp_path)
    path = store.path(suite="s", check_id="c", variant="fp16")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"text": "a", "extra": 1}))
    with pytest.raises(GoldenError) as info:
        store.assert_matches(path, {"text": "a"}, explain=lambda exp, act: "")
    assert "'extra'" in str(info.value)


def test_a_difference_the_kind_does_not_explain_still_gets_a_reason(tmp_path):
    store = _store(tmp_path)
    path = store.path(suite="s", check_id="c", variant="fp16")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"text": "a", "ids": [1]}))
    with pytest.raises(AssertionError) as info:
        store.assert_matches(path, {"text": "b", "ids": [1]}, explain=lambda exp, act: "")
    assert str(info.value).startswith('text: expected "a", got "b"\n')
