"""``generation_config``: the effective generation settings are a model-level golden; an edit names the setting."""

from __future__ import annotations

import json

import pytest

from harness.checks.generation_config import GenerationConfigSpec, explain_settings
from harness.models.generation_settings import effective_generation_settings

SUITE = """
suite: gen
checks:
  - id: settings
    kind: generation_config
"""


def test_workflow_record_pass_then_an_edit_names_each_changed_setting(project, editable_model):
    model = editable_model("mygen")
    project.suite("gen", SUITE)
    project.run(f"--model={model}", "--variants", "fp16").assert_outcomes(failed=1)
    assert project.goldens() == []
    project.run(f"--model={model}", "--variants", "fp16", "--snapshot-update").assert_outcomes(passed=1)
    assert project.goldens() == ["mygen/tokenizer/gen/settings.json"]
    golden = json.loads((project.golden / "mygen/tokenizer/gen/settings.json").read_text(encoding="utf-8"))
    assert golden["settings"]["eos_token_id"] == [2] and golden["settings"]["do_sample"] is False
    assert golden["settings"]["max_length"] == 20 and golden["tokens"]["eos_token_id"] == ["<|im_end|>"]
    project.run(f"--model={model}", "--variants", "fp16").assert_outcomes(passed=1)

    path = model / "generation_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config.update(do_sample=True, temperature=0.6, eos_token_id=[2, 0])
    path.write_text(json.dumps(config), encoding="utf-8")
    result = project.run(f"--model={model}", "--variants", "fp16")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "the effective generation settings changed (4 settings); every user's generate() output can change*",
        "  eos_token_id: golden [2], now [2, 0]",
        "  do_sample: golden false, now true",
        "  temperature: golden 1.0, now 0.6",
        "  eos_token_id (as tokens): golden [\"<|im_end|>\"], now [\"<|im_end|>\", \"<|endoftext|>\"]",
    ])
    assert "pad_token_id" not in result.stdout.str().split("the effective generation settings changed")[1]


def test_effective_settings_apply_generate_defaults_and_pad_fallback():
    from transformers import GenerationConfig

    settings = effective_generation_settings(GenerationConfig(eos_token_id=[7, 9], repetition_penalty=1.3))
    assert settings["repetition_penalty"] == 1.3 and settings["top_k"] == 50 and settings["max_length"] == 20
    assert settings["pad_token_id"] == 7 and "eos_token_id" in settings["pad_token_id_from"]


def test_explain_lists_removed_and_added_settings():
    text = explain_settings({"settings": {"top_k": 50, "stop_strings": None}, "tokens": {}},
                            {"settings": {"top_k": 20, "min_p": 0.1}, "tokens": {}})
    assert "top_k: golden 50, now 20" in text and "stop_strings: golden null, now (not set)" in text
    assert "min_p: golden (not set), now 0.1" in text


def test_spec_refuses_unknown_ignored_setting():
    with pytest.raises(ValueError, match="did you mean 'temperature'"):
        GenerationConfigSpec.model_validate({"id": "g", "kind": "generation_config", "ignore": ["temprature"]})


def test_greedy_settings_are_a_filter_of_what_generate_resolves():
    from transformers import GenerationConfig

    from harness.models.generation_settings import GREEDY_SETTINGS, SETTINGS, greedy_settings

    assert set(GREEDY_SETTINGS) <= set(SETTINGS)
    assert greedy_settings(GenerationConfig(eos_token_id=2)) == {"eos_token_id": [2]}
    # a value generate() resolves to anyway does nothing, and is not listed
    assert greedy_settings(GenerationConfig(eos_token_id=[9, 2], repetition_penalty=1.0)) == {"eos_token_id": [2, 9]}
    settings = greedy_settings(GenerationConfig(eos_token_id=2, repetition_penalty=1.3, no_repeat_ngram_size=3,
                                                temperature=0.2, do_sample=True))
    assert settings == {"eos_token_id": [2], "repetition_penalty": 1.3, "no_repeat_ngram_size": 3}


def test_a_greedy_golden_fails_on_a_changed_generation_setting_naming_it():
    """The golden's ``generation`` block is judged, not only shown: same tokens, another eos, a failure."""
    from types import SimpleNamespace

    from harness.golden.greedy_format import golden_record
    from harness.judge.greedy import GoldenJudgement
    from harness.judge.tolerance import NoiseModel
    from harness.observe.observation import Observation, Step

    tokenizer = SimpleNamespace(decode=lambda ids, skip_special_tokens=False: "".join(f"<{i}>" for i in ids))
    observed = Observation(prompt_ids=(1,), steps=(Step(5, -0.1, ((5, -0.1), (6, -2.5))),), stop="length")
    golden = golden_record(observed, tokenizer, settings={"eos_token_id": [2]}, max_new_tokens=1)
    actual = golden_record(observed, tokenizer, settings={"eos_token_id": [2, 7]}, max_new_tokens=1)
    judgement = GoldenJudgement(observed=observed, tokenizer=tokenizer, tol=NoiseModel().tolerance("fp16"),
                                rescore=lambda ids: ())
    assert judgement.judge(golden, golden)
    assert not judgement.judge(golden, actual)
    assert "generation setting eos_token_id changed: golden [2], this run [2, 7]" in judgement.explain(golden, actual)
