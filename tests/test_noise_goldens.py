"""Greedy goldens judged up to numerical noise, on the real embedded model.

Near-ties are constructed by editing a recorded golden where the model's two
best tokens are close (or by recording the runner-up's path with the model
itself); drift by scaling one layer's weights in a model copy.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from conftest import CAPITAL_SUITE as CAPITAL, scale_weight

GOLDEN = "smollm2-135m/cpu/fp16/gen/capital.json"


def capital_suite(project: Any, n: int = 6, extra: str = "") -> None:
    project.suite("gen", CAPITAL.format(n=n, extra=extra))


def swap_top_two(path: Path, step: int) -> tuple[int, int, float]:
    """Make the golden say the runner-up was chosen at ``step`` (log-probs unchanged): what a flip looks like."""
    golden = json.loads(path.read_text())
    numbers, _, texts = golden["trace"][step].partition(" # ")
    entries = [e.split() for e in numbers.split(" | ")]
    (first, lp1), (second, lp2) = entries[0], entries[1]
    entries[0], entries[1] = [second, lp1], [first, lp2]
    golden["trace"][step] = " | ".join(" ".join(e) for e in entries)
    golden["new_token_ids"][step] = int(second)
    path.write_text(json.dumps(golden, indent=2))
    return int(first), int(second), float(lp1) - float(lp2)


def test_accepted_near_tie_is_reported_in_summary_and_report(project):
    capital_suite(project, extra="    tolerance: {tie_gap: 0.5, max_margin_shift: 0.5, max_abs_dlogp: 0.5}\n")
    project.record("--variants", "fp16", passed=1)
    chosen, runner_up, gap = swap_top_two(project.golden / GOLDEN, 5)
    assert 0 < gap < 0.5
    result = project.run("--variants", "fp16", "--harness-report", "report.md")
    result.assert_outcomes(passed=1)
    line = f"*accepted near-tie at step 5 of capital?fp16?, gap {gap:.3g}*"
    result.stdout.fnmatch_lines([line])
    report = (project.path / "report.md").read_text()
    assert f"- accepted near-tie at step 5 of capital[fp16], gap {gap:.3g}" in report
    assert f"(id {runner_up}) vs " in report and f"(id {chosen})" in report


def test_near_tie_followed_by_the_golden_path_is_teacher_forced_and_passes(project, embedded_model_dir):
    """A golden recorded along the runner-up at a near-tie: the flip is accepted and the golden's
    remaining tokens, scored with the model under test, still agree."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from harness.golden.greedy_format import golden_record
    from harness.observe.observation import Observation
    from harness.observe.observation import generation_settings, observe_greedy

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir)
    model = AutoModelForCausalLM.from_pretrained(embedded_model_dir, dtype=torch.float16).eval()
    prompt = list(tokenizer("The capital of France is")["input_ids"])
    free = observe_greedy(model, tokenizer, prompt, 10)
    k = 5
    runner_up = free.steps[k].top[1][0]
    after = observe_greedy(model, tokenizer, prompt + list(free.token_ids[:k]) + [runner_up], 10 - k - 1)
    flipped = Observation(prompt_ids=tuple(prompt), stop=after.stop, steps=free.steps[:k] + (
        type(free.steps[k])(runner_up, free.steps[k].top[1][1], free.steps[k].top),) + after.steps)
    record = golden_record(flipped, tokenizer, settings=generation_settings(model), max_new_tokens=10)
    (project.golden / GOLDEN).parent.mkdir(parents=True)
    (project.golden / GOLDEN).write_text(json.dumps(record, indent=2))

    capital_suite(project, n=10, extra="    tolerance: {tie_gap: 0.5, max_margin_shift: 0.5}\n")
    result = project.run("--variants", "fp16")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*accepted near-tie at step 5 of capital?fp16?, gap *"])


def test_near_tie_whose_remaining_golden_tokens_do_not_fit_fails_with_teacher_forced_evidence(project):
    capital_suite(project, n=10, extra="    tolerance: {tie_gap: 0.5, max_margin_shift: 0.5}\n")
    project.record("--variants", "fp16", passed=1)
    swap_top_two(project.golden / GOLDEN, 5)  # the tokens after step 5 were generated after the other token
    result = project.run("--variants", "fp16")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "accepted near-tie at step 5" in out
    assert "teacher-forcing the golden's tokens after an accepted near-tie" in out or "|Δ log p|" in out


def test_non_tie_divergence_is_rejected_with_log_prob_evidence(project):
    capital_suite(project)
    project.record("--variants", "fp16", passed=1)
    _, _, gap = swap_top_two(project.golden / GOLDEN, 0)
    assert gap > 1.0
    result = project.run("--variants", "fp16")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "*greedy output diverges at new token 0: expected * (log p * in the golden), got ' Paris' (id 7042)*"
        "not a near-tie, a real change*",
        "*golden top-5 at new token 0: *",
        "*tolerance: per step |Δ log p| *, margin * for recorded noise x4*",
    ])


def test_sub_token_drift_fails_with_identical_ids(project, embedded_model_dir: Path, tmp_path):
    """One layer scaled by 1.2: no token changes, the log-probabilities move beyond fp16 noise."""
    model_dir = tmp_path / "mymodel"
    shutil.copytree(embedded_model_dir, model_dir)
    capital_suite(project)
    project.run("--model", str(model_dir), "--variants", "fp16", "--snapshot-update").assert_outcomes(passed=1)
    golden = json.loads((project.golden / "mymodel/cpu/fp16/gen/capital.json").read_text())

    scale_weight(model_dir, "model.layers.3.mlp.down_proj.weight", 1.2)
    result = project.run("--model", str(model_dir), "--variants", "fp16", "--harness-obtained", "obtained")
    result.assert_outcomes(failed=1)
    # caught by the log-probs' mean or by the margins under them (a confident token's log-prob hides a move)
    result.stdout.fnmatch_lines(["*over 6 steps > * for recorded noise x4*"])
    assert "diverges" not in result.stdout.str()
    obtained = json.loads((project.path / "obtained/mymodel/cpu/fp16/gen/capital.json").read_text())
    assert obtained["new_token_ids"] == golden["new_token_ids"]


def test_fragile_golden_is_reported_when_recorded(project):
    project.suite("gen", CAPITAL.format(n=6, extra="").replace('"The capital of France is"',
                                                                '"Three primary colours are red,"'))
    result = project.run("--variants", "nf4", "--snapshot-update", "--harness-report", "report.md")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["fragile golden capital?nf4?: at * step(s) its margin is within its own recorded "
                                 "noise, where a benign change can flip it (steps *"])
    assert "- fragile golden capital[nf4]: " in (project.path / "report.md").read_text()
    plain = project.run("--variants", "nf4")  # only reported when recorded
    assert "fragile golden" not in plain.stdout.str()


def test_cross_device_judgement_is_labelled_and_writes_nothing(project):
    capital_suite(project)
    project.record("--variants", "fp16", passed=1)
    (project.golden / "smollm2-135m/cpu").rename(project.golden / "smollm2-135m/cuda-sm90")
    missing = project.run("--variants", "fp16")
    missing.assert_outcomes(failed=1)
    missing.stdout.fnmatch_lines(["*No goldens are recorded for model 'smollm2-135m' on device class 'cpu'*"
                                  "--golden-device cuda-sm90*"])
    judged = project.run("--variants", "fp16", "--golden-device", "auto", "--harness-report", "report.md")
    judged.assert_outcomes(passed=1)
    judged.stdout.fnmatch_lines(["capital?fp16? judged against cuda-sm90 goldens, tolerance *cross-device x3 "
                                 "(assumed, not measured)*"])
    assert "judged against cuda-sm90 goldens" in (project.path / "report.md").read_text()
    assert not (project.golden / "smollm2-135m/cpu").exists()
    # a failure says which goldens judged it
    swap_top_two(project.golden / "smollm2-135m/cuda-sm90/fp16/gen/capital.json", 0)
    failed = project.run("--variants", "fp16", "--golden-device", "cuda-sm90")
    failed.assert_outcomes(failed=1)
    failed.stdout.fnmatch_lines(["*judged against cuda-sm90 goldens, with the cross-device x3 (assumed, not "
                                 "measured) tolerance*",
                                 "golden (judged against cuda-sm90 goldens): *cuda-sm90/fp16/gen/capital.json"])
    assert not (project.golden / "smollm2-135m/cpu").exists()


def test_old_format_golden_gives_a_clear_message_then_updates(project):
    capital_suite(project)
    path = project.golden / GOLDEN
    path.parent.mkdir(parents=True)
    old = {"max_new_tokens": 6, "new_token_ids": [7042, 30, 198, 198, 504, 2988], "prompt_tokens": 5,
           "text": " Paris.\n\nThe answer"}
    path.write_text(json.dumps(old, indent=2, sort_keys=True))
    result = project.run("--variants", "fp16")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([f"*Golden file {path.relative_to(project.path)} cannot be judged: this golden was recorded in format 1 by an "
                                 "earlier harness*"
                                 "re-record it with --snapshot-update and review the diff*"])
    project.run("--variants", "fp16", "--snapshot-update").assert_outcomes(passed=1)
    new = json.loads(path.read_text())
    assert new["format"] == 2 and new["new_token_ids"] == old["new_token_ids"] and len(new["trace"]) == 6
    project.run("--variants", "fp16").assert_outcomes(passed=1)


def test_a_changed_generation_setting_is_named_in_the_failure(project, embedded_model_dir: Path, tmp_path):
    """repetition_penalty in the model's generation_config still applies under forced greedy decoding."""
    model_dir = tmp_path / "mymodel"
    shutil.copytree(embedded_model_dir, model_dir)
    capital_suite(project, n=12)
    project.run("--model", str(model_dir), "--variants", "fp16", "--snapshot-update").assert_outcomes(passed=1)
    golden = json.loads((project.golden / "mymodel/cpu/fp16/gen/capital.json").read_text())
    assert golden["generation"] == {"eos_token_id": [2]}
    config = json.loads((model_dir / "generation_config.json").read_text())
    config["repetition_penalty"] = 1.5
    (model_dir / "generation_config.json").write_text(json.dumps(config))
    result = project.run("--model", str(model_dir), "--variants", "fp16")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*generation setting repetition_penalty changed: golden None, this run 1.5 (from "
                                 "the model's generation_config; it applies under greedy decoding too*"])
