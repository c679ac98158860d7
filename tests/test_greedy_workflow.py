"""The golden workflow on the real embedded model: missing -> update -> pass -> change -> fail -> update."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import scale_weight



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
    project.record("--variants", "fp16", passed=2)
    assert project.goldens() == [
        "smollm2-135m/cpu/fp16/gen/capital.json",
        "smollm2-135m/cpu/fp16/gen/joke.json",
    ]
    golden = json.loads((project.golden / "smollm2-135m/cpu/fp16/gen/joke.json").read_text())
    assert set(golden) == {"format", "text", "new_token_ids", "prompt_tokens", "max_new_tokens", "stop",
                           "generation", "top_k", "trace"}
    assert golden["format"] == 2 and golden["generation"]["eos_token_id"] == [2]
    assert len(golden["new_token_ids"]) <= 12 and golden["text"]
    # one readable line per step: the chosen token's log-prob first, then the other top-5, then texts
    assert len(golden["trace"]) == len(golden["new_token_ids"])
    first = golden["trace"][0]
    assert first.startswith(f"{golden['new_token_ids'][0]} -") and first.count(" | ") == 4 and " # '" in first
    meta = json.loads((project.golden / "smollm2-135m/cpu/fp16/gen/joke.meta.json").read_text())
    assert meta["model_fingerprint"] and meta["versions"]["torch"]
    result = project.run("--variants", "fp16", "-v")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*suites/gen.yaml::joke?fp16? PASSED*", "*loaded fp16: 1x*"])


def test_changed_golden_fails_with_first_divergence_and_diff(project):
    project.gen_suite(joke=12, capital=6)
    project.record("--variants", "fp16", passed=2)
    path = project.golden / "smollm2-135m/cpu/fp16/gen/capital.json"
    golden = json.loads(path.read_text())
    golden["new_token_ids"][1] = 28  # the token ",", with the log-probs of the recorded "." and ","
    golden["trace"][1] = "28 -0.3831 | 30 -1.6487"
    golden["text"] = "tampered"
    path.write_text(json.dumps(golden))
    result = project.run("--variants", "fp16")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([
        "*greedy output diverges at new token 1: expected ',' (id 28) (log p -0.383 in the golden), got '.' "
        "(id 30) (log p -0.383); log-prob gap 1.266 in the golden and 1.266 in this run: the margin between "
        "the two tokens moved by 2.53 through the flip, more than the step's allowance * for recorded noise x4: "
        "not a near-tie, a real change*",
        "*golden top-2 at new token 1: ',' (id 28) -0.383, '.' (id 30) -1.649*",
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

    scale_weight(model_dir, "model.layers.3.mlp.down_proj.weight", 1.5)

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
