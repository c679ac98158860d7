"""The golden workflow on the real embedded model: missing -> update -> pass -> change -> fail -> update."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest



def test_missing_golden_fails_and_writes_nothing(project):
    project.gen_suite(joke=12, capital=6)
    result = project.run("--variants", "fp16")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(["*No goldens are recorded for model 'smollm2-135m' on device class 'cpu'*"])
    assert project.goldens() == []
    again = project.run("--variants", "fp16")
    again.assert_outcomes(failed=2)
    assert project.goldens() == []


def test_update_then_rerun_passes(project):
    project.gen_suite(joke=12, capital=6)
    project.run("--variants", "fp16", "--snapshot-update").assert_outcomes(passed=2)
    assert project.goldens() == [
        "smollm2-135m/cpu/fp16/gen/capital.json",
        "smollm2-135m/cpu/fp16/gen/joke.json",
    ]
    golden = json.loads((project.golden / "smollm2-135m/cpu/fp16/gen/joke.json").read_text())
    assert set(golden) == {"prompt_tokens", "max_new_tokens", "new_token_ids", "text"}
    assert len(golden["new_token_ids"]) <= 12 and golden["text"]
    meta = json.loads((project.golden / "smollm2-135m/cpu/fp16/gen/joke.meta.json").read_text())
    assert meta["model_fingerprint"] and meta["versions"]["torch"]
    result = project.run("--variants", "fp16", "-v")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*suites/gen.yaml::joke?fp16? PASSED*", "*loaded fp16: 1x*"])


def test_changed_golden_fails_with_first_divergence_and_diff(project):
    project.gen_suite(joke=12, capital=6)
    project.run("--variants", "fp16", "--snapshot-update").assert_outcomes(passed=2)
    path = project.golden / "smollm2-135m/cpu/fp16/gen/capital.json"
    golden = json.loads(path.read_text())
    golden["new_token_ids"][1] = 28  # the token ","
    golden["text"] = "tampered"
    path.write_text(json.dumps(golden))
    result = project.run("--variants", "fp16")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([
        "*greedy output diverges at new token 1: expected ',' (id 28), got *",
        "*logits at that step: *margin*",
        "*text diff:*",
        "*-tampered*",
        "*golden: *capital.json*",
        "*update with --snapshot-update*",
    ])


def test_changed_layer_weights_fail_only_the_affected_checks(project, embedded_model_dir: Path, tmp_path):
    """A subtle weight change (one layer) is caught; the tokenizer-only goldens are unaffected."""
    model_dir = tmp_path / "mymodel"
    shutil.copytree(embedded_model_dir, model_dir)
    project.gen_suite(joke=12, capital=6)
    project.run("--model", str(model_dir), "--variants", "fp16", "--snapshot-update").assert_outcomes(passed=2)
    assert (project.golden / "mymodel/cpu/fp16/gen/joke.json").exists()

    from safetensors.torch import load_file, save_file

    weights = load_file(model_dir / "model.safetensors")
    name = "model.layers.3.mlp.down_proj.weight"
    weights[name] = weights[name] * 1.5
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})

    result = project.run("--model", str(model_dir), "--variants", "fp16")
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) >= 1
    result.stdout.fnmatch_lines([
        "*greedy output diverges at new token*",
        "*The model (or adapter) changed since these goldens were recorded*",
        "*the model's weights changed since this golden was recorded*",
    ])


def test_snapshot_update_refused_in_ci(project, monkeypatch):
    project.gen_suite(joke=12, capital=6)
    monkeypatch.setenv("CI", "true")
    result = project.run("--variants", "fp16", "--snapshot-update")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--snapshot-update refused: the CI environment variable is set*"])
    assert project.goldens() == []
    allowed = project.run("--variants", "fp16", "--snapshot-update", "--allow-update-in-ci")
    allowed.assert_outcomes(passed=2)
