"""Bad input, messages: each names what is actually wrong (the adapter, the variable, the option given).

Examples found by trying the harness from outside are marked "example"; the other cases are invented ones of the same classes.
YAML merge keys, ``defaults: {id: ...}`` and orphan sidecars are in test_bad_input_checks.py and
test_bad_input_writers.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from harness.errors import AdapterError, ModelNotFoundError
from harness.models.adapters import adapter_config, load_adapter


def _tiny_base() -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32))


@pytest.fixture
def tiny_adapter(tmp_path: Path) -> Path:
    """A trained-looking LoRA (rank 2, lora_B non-zero) for the tiny base, saved as save_pretrained writes it."""
    import torch
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_tiny_base(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    folder = tmp_path / "adapter"
    model.save_pretrained(folder)
    return folder


def _edit_config(folder: Path, **changes: Any) -> None:
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(config))


def test_the_tiny_adapter_loads(tiny_adapter):
    assert adapter_config(tiny_adapter)["r"] == 2
    load_adapter(_tiny_base(), tiny_adapter, model_name="tiny")


def test_example_an_r_that_disagrees_with_the_tensors_is_the_adapters_fault_not_the_base(tiny_adapter):
    _edit_config(tiny_adapter, r=4)
    with pytest.raises(AdapterError) as info:
        load_adapter(_tiny_base(), tiny_adapter, model_name="tiny")  # the base it was trained on
    message = str(info.value)
    assert "adapter_config.json declares r = 4, but its tensors have rank 2" in message
    assert "trained for" not in message and "another base" not in message


def test_example_an_empty_adapter_config_names_the_missing_peft_type(tiny_adapter):
    (tiny_adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(AdapterError, match=r"adapter_config.json has no peft_type.*holds no settings at all"):
        load_adapter(_tiny_base(), tiny_adapter, model_name="tiny")


def test_example_a_non_lora_adapter_is_named_as_such(tiny_adapter):
    _edit_config(tiny_adapter, peft_type="IA3")
    with pytest.raises(AdapterError, match=r"is a IA3 adapter \(peft_type in adapter_config.json\); the harness "
                                           r"applies LoRA adapters only"):
        load_adapter(_tiny_base(), tiny_adapter, model_name="tiny")


def test_example_nan_lora_b_is_named_nan_not_still_zero(tiny_adapter):
    from safetensors.torch import load_file, save_file

    weights = load_file(tiny_adapter / "adapter_model.safetensors")
    key = next(k for k in sorted(weights) if "lora_B" in k)
    weights[key] = weights[key] * float("nan")
    save_file(weights, tiny_adapter / "adapter_model.safetensors")
    with pytest.raises(AdapterError) as info:
        load_adapter(_tiny_base(), tiny_adapter, model_name="tiny")
    assert "holds NaN or infinite weights in 1 LoRA tensors" in str(info.value)
    assert "still zero" not in str(info.value)


@pytest.mark.parametrize(("damage", "words"), [
    (lambda f: _edit_config(f, r=0), "r = 0; a LoRA rank is a whole number of at least 1"),
    (lambda f: (f / "adapter_model.safetensors").write_bytes(b"not a safetensors file"),
     "adapter_model.safetensors is not a safetensors file"),
    (lambda f: (f / "adapter_config.json").write_text("[1, 2]"), "holds a list, not a mapping"),
])
def test_other_damaged_adapters_are_named_before_anything_loads(tiny_adapter, damage, words):
    damage(tiny_adapter)
    with pytest.raises(AdapterError, match=words.replace("(", r"\(").replace(")", r"\)")):
        adapter_config(tiny_adapter)


def test_example_an_attention_kernel_from_the_environment_names_the_variable(project, monkeypatch):
    project.suite("s", "checks:\n  - {id: a, kind: tokenization, texts: [Hi]}\n")
    monkeypatch.setenv("HARNESS_ATTN_IMPLEMENTATION", "fast")
    result = project.run()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*the environment variable HARNESS_ATTN_IMPLEMENTATION (read when "
                                 "--attn-implementation is not given): unknown attention implementation 'fast'*"
                                 "Fix: correct or unset HARNESS_ATTN_IMPLEMENTATION.*"])
    result = project.run("--attn-implementation", "eagr")  # the option wins, and is named
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--attn-implementation: unknown attention implementation 'eagr'; did you mean "
                                 "'eager'?*"])
    assert "HARNESS_ATTN_IMPLEMENTATION" not in result.stderr.str()


def test_example_a_reference_not_found_offline_suggests_reference_path(tmp_path, monkeypatch):
    from harness.models.registry import Registry
    from harness.models.sources import resolve

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    registry = Registry(path=tmp_path / "models.yaml", default="", models={})
    with pytest.raises(ModelNotFoundError) as info:
        resolve("some-org/old-model", registry=registry, rootdir=tmp_path, option="--reference")
    assert "or pass --reference PATH to a local copy" in str(info.value)
    assert "--model" not in str(info.value)
