"""Reports show paths relative to the rootdir: nothing of the machine that made them."""

from __future__ import annotations

import json
from pathlib import Path

from harness.report.display import relative_paths, shown_path

TOK_SUITE = """
suite: tok
checks:
  - id: short
    kind: tokenization
    texts: ["The quick brown fox.", "Hello world"]
"""


def test_shown_path_inside_and_outside_the_root(tmp_path):
    root = tmp_path / "repo"
    assert shown_path(root / "golden" / "m" / "a.json", root) == "golden/m/a.json"
    assert shown_path(root, root) == "."
    assert shown_path(tmp_path / "repo-other" / "a.json", root) == str(tmp_path / "repo-other" / "a.json")
    assert shown_path("/elsewhere/a.json", root) == "/elsewhere/a.json"


def test_relative_paths_rewrites_only_paths_inside_the_root(tmp_path):
    root = tmp_path / "repo"
    text = (f"golden: {root}/golden/m/a.json\n`git checkout -- {root}/golden/m/a.json`\n"
            f"obtained: {tmp_path}/obtained/a.json\nsibling {root}-2/x and {root}x/y\n"
            f"({root}/models/a) rootdir {root}\n")
    assert relative_paths(text, root) == (
        "golden: golden/m/a.json\n`git checkout -- golden/m/a.json`\n"
        f"obtained: {tmp_path}/obtained/a.json\nsibling {root}-2/x and {root}x/y\n"
        "(models/a) rootdir .\n")


def test_a_filesystem_root_rewrites_nothing():
    assert relative_paths("golden: /golden/a.json", Path("/")) == "golden: /golden/a.json"
    assert shown_path("/golden/a.json", Path("/")) == "/golden/a.json"


def test_report_and_golden_listings_have_no_machine_path(project, tmp_path):
    """A red run with obtained files, an unused golden and a stale sidecar (the edited golden's):
    the failure, the Markdown report and the terminal's golden listings name files relative to
    the rootdir; a path outside it (here --harness-obtained) is shown as given."""
    project.suite("tok", TOK_SUITE)
    update = project.run("--variants", "fp16", "--snapshot-update")
    update.assert_outcomes(passed=1)
    update.stdout.fnmatch_lines(["goldens written or updated: 1", "  golden/smollm2-135m/tokenizer/tok/short.json"])
    golden = project.golden / "smollm2-135m/tokenizer/tok/short.json"
    data = json.loads(golden.read_text(encoding="utf-8"))
    data["texts"][0]["ids"][1] += 1
    golden.write_text(json.dumps(data), encoding="utf-8")
    (project.golden / "smollm2-135m/tokenizer/tok/removed.json").write_text("{}", encoding="utf-8")
    outside = tmp_path / "obtained-outside"

    result = project.run("--variants", "fp16", "--harness-report", "report.md",
                         "--harness-obtained", str(outside))
    result.assert_outcomes(failed=1)
    report = (project.path / "report.md").read_text(encoding="utf-8")
    assert "golden: golden/smollm2-135m/tokenizer/tok/short.json" in report
    assert f"obtained: {outside}/smollm2-135m/tokenizer/tok/short.json" in report
    assert "adapter: `fixtures/adapters/smollm2-135m-pirate`" in report
    assert str(project.path) not in report
    result.stdout.fnmatch_lines([  # the failure itself, in the terminal and JUnit too
        "golden: golden/smollm2-135m/tokenizer/tok/short.json",
        f"obtained: {outside}/smollm2-135m/tokenizer/tok/short.json",
    ])
    result.stdout.fnmatch_lines([
        "golden sidecars that cannot be trusted (1)*",
        "  golden/smollm2-135m/tokenizer/tok/short.meta.json: describes another version of its golden*",
        "goldens that no check used (1)*",
        "  golden/smollm2-135m/tokenizer/tok/removed.json",
    ])

    inside = project.run("--variants", "fp16", "--harness-report", "report.md", "--harness-obtained", "obtained")
    inside.assert_outcomes(failed=1)
    report = (project.path / "report.md").read_text(encoding="utf-8")
    assert "obtained: obtained/smollm2-135m/tokenizer/tok/short.json" in report
    assert str(project.path) not in report
