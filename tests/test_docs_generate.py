"""docs/generate.py: marker blocks, machine paths, and one real (small) generation."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("docs_generate", REPO / "docs" / "generate.py")
generate = importlib.util.module_from_spec(_spec)
sys.modules["docs_generate"] = generate  # dataclasses look their module up there
_spec.loader.exec_module(generate)

DOC = """# Title

Intro.

1. A step:

   <!-- generated: demo (python docs/generate.py --only demo) -->
   ```text
   old
   ```
   <!-- end generated -->

Middle.

<!-- generated: demo -->
stale
<!-- end generated -->
<!-- generated: other -->
kept
<!-- end generated -->
"""


def test_blocks_are_replaced_with_their_marker_indentation_and_idempotently():
    new = generate.replace_blocks(DOC, "demo", "```text\nfirst\n\nsecond\n```\n", source="doc.md")
    assert new == DOC.replace(
        "   ```text\n   old\n   ```\n", "   ```text\n   first\n\n   second\n   ```\n"
    ).replace(
        "<!-- generated: demo -->\nstale\n",
        "<!-- generated: demo (python docs/generate.py --only demo) -->\n```text\nfirst\n\nsecond\n```\n",
    )
    assert "kept" in new and "stale" not in new and "old" not in new
    assert generate.replace_blocks(new, "demo", "```text\nfirst\n\nsecond\n```\n", source="doc.md") == new


def test_a_missing_marker_or_end_is_an_error_not_a_skipped_example():
    with pytest.raises(generate.GenerationError, match=r"doc.md: no '<!-- generated: absent"):
        generate.replace_blocks(DOC, "absent", "x\n", source="doc.md")
    broken = "a\n<!-- generated: demo -->\nb\n<!-- generated: demo -->\nc\n<!-- end generated -->\n"
    with pytest.raises(generate.GenerationError, match=r"doc.md:2: the 'demo' block has no"):
        generate.replace_blocks(broken, "demo", "x\n", source="doc.md")


def test_machine_paths_are_made_relative_or_refused(tmp_path):
    project = tmp_path / "project"
    text = (f"golden: {project}/golden/m/cpu/fp16/s/c.json\nmodel: {Path.home()}/.cache/llm-behave-harness/m\n")
    assert generate.machine_free(text, roots=[project, tmp_path], what="demo") == (
        "golden: golden/m/cpu/fp16/s/c.json\nmodel: ~/.cache/llm-behave-harness/m\n")
    with pytest.raises(generate.GenerationError, match="demo: the output still names a path of this machine"):
        generate.machine_free(f"obtained: {tmp_path}/elsewhere.json", roots=[project], what="demo")


def test_another_machines_path_is_refused_too():
    with pytest.raises(generate.GenerationError, match=r"\(/work/\.\.\.\)"):
        generate.machine_free("adapter: `/work/main/fixtures/adapters/a`", roots=[], what="demo")


def test_the_green_report_marks_its_wall_time_as_one_machines():
    report = (f"# Behaviour report: m\n\n- adapter: `{generate.REPO}/fixtures/adapters/a` fingerprint `f`\n"
              "- **result: green** (75 passed, 1 skipped) in 82 s\n")
    text = generate.green_text(report)
    assert text.startswith("<!-- generated (python docs/generate.py --only green-report)")
    assert "- adapter: `fixtures/adapters/a` fingerprint `f`\n" in text
    assert text.endswith("- **result: green** (75 passed, 1 skipped) in 82 s (wall time on the machine that "
                         "generated this example)\n")
    with pytest.raises(generate.GenerationError, match="no '- \\*\\*result: green"):
        generate.green_text("- **result: red** (1 failed) in 3 s\n")


def test_the_repository_docs_have_the_markers_the_script_fills():
    for doc in ("README.md", "docs/gate.md"):
        text = (REPO / doc).read_text(encoding="utf-8")
        generate.replace_blocks(text, "failure-example", "x\n", source=doc)


def test_a_real_failure_example_on_a_six_token_suite(tmp_path):
    """The script's failure-example part, end to end on the real model (greedy checks cut to 6 tokens: the regression first moves a step beyond its allowance at step 5)."""
    (tmp_path / "docs").mkdir()
    shutil.copy(REPO / "README.md", tmp_path / "README.md")
    shutil.copy(REPO / "docs" / "gate.md", tmp_path / "docs" / "gate.md")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "docs" / "generate.py"), "--only", "failure-example",
         "--docs-root", str(tmp_path), "--max-new-tokens", "6"],
        capture_output=True, text=True, env=env, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "generate: failure-example: wrote README.md, docs/gate.md in " in proc.stdout
    for doc in (tmp_path / "README.md", tmp_path / "docs" / "gate.md"):
        text = doc.read_text(encoding="utf-8")
        block = text.split("<!-- generated: failure-example", 1)[1].split(generate.END_MARKER, 1)[0]
        assert "generation.yaml:" in block and "capital-raw[fp16]" in block
        assert "golden: golden/smollm2-135m/cpu/fp16/generation/capital-raw.json" in block
        assert "the model's weights changed since this golden was recorded" in block
        assert str(tmp_path) not in text and tempfile_root() not in block
    readme = (tmp_path / "README.md").read_text(encoding="utf-8")
    assert readme.split("<!-- generated: failure-example")[0] == (
        (REPO / "README.md").read_text(encoding="utf-8").split("<!-- generated: failure-example")[0])


def tempfile_root() -> str:
    import tempfile

    return tempfile.gettempdir() + "/"
