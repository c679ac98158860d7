"""The four variants on the real embedded model: load once, NF4 skip, the adapter and its errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

SUITE = """
suite: gen
checks:
  - id: joke
    kind: greedy
    messages:
      - {role: user, content: "Create a funny joke about chickens."}
    max_new_tokens: 6
  - id: capital
    kind: greedy
    messages:
      - {role: user, content: "What is the capital of France?"}
    max_new_tokens: 4
"""

REPO = Path(__file__).resolve().parents[1]
ADAPTER = REPO / "fixtures" / "adapters" / "smollm2-135m-pirate"


def test_each_variant_loads_once_and_the_adapter_changes_the_answers(project):
    project.suite("gen", SUITE.split("  - id: capital")[0])  # the joke: where the adapter shows
    result = project.run("--snapshot-update", "-v")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines([
        "*joke?fp16? PASSED*", "*joke?fp16-lora? PASSED*", "*joke?nf4? PASSED*", "*joke?nf4-lora? PASSED*",
    ])
    for key in ("fp16", "fp16-lora", "nf4", "nf4-lora"):
        result.stdout.fnmatch_lines([f"loaded {key}: 1x, *weights * MiB"])
    texts = {
        key: json.loads((project.golden / f"smollm2-135m/cpu/{key}/gen/joke.json").read_text())["text"]
        for key in ("fp16", "fp16-lora", "nf4", "nf4-lora")
    }
    assert texts["fp16-lora"] != texts["fp16"] and texts["nf4-lora"] != texts["nf4"]
    assert texts["fp16-lora"].startswith("Arr") and texts["nf4-lora"].startswith("Arr")
    assert not texts["fp16"].startswith("Arr")


def test_nf4_is_skipped_with_the_reason_where_bitsandbytes_cannot_run(project):
    project.suite("gen", SUITE)
    (project.path / "conftest.py").write_text(
        "import harness.models.pool\n"
        "harness.models.pool.nf4_unsupported_reason = lambda device: 'bitsandbytes: simulated missing backend'\n"
    )
    result = project.run("--variants", "fp16,nf4", "--snapshot-update", "-rs")
    result.assert_outcomes(passed=2, skipped=2)
    result.stdout.fnmatch_lines(["*SKIPPED*NF4 is not available on CPU: bitsandbytes: simulated missing backend*"])


BROKEN_BNB = {
    # an exception inside a kernel that exists: a broken install, not a platform without NF4
    "quantize-raises": (
        "import bitsandbytes.functional as f\n"
        "def broken(*a, **k):\n"
        "    raise RuntimeError('simulated: CUDA Setup failed despite GPU being available')\n"
        "f.quantize_4bit = broken\n",
        "*NF4 cannot load: bitsandbytes failed to quantize a test tensor on CPU (RuntimeError: simulated: "
        "CUDA Setup failed*",
    ),
    # an import error inside bitsandbytes (one of its own modules is missing)
    "import-breaks": (
        "import sys\nsys.modules['bitsandbytes.functional'] = None\n",
        "*NF4 cannot load: bitsandbytes is installed but broken on this machine (ModuleNotFoundError:*",
    ),
}


@pytest.mark.parametrize("fault", sorted(BROKEN_BNB))
def test_a_broken_bitsandbytes_fails_the_nf4_items_instead_of_skipping(project, fault):
    code, expected = BROKEN_BNB[fault]
    project.suite("gen", SUITE)
    (project.path / "conftest.py").write_text(code)
    result = project.run("--variants", "fp16,nf4", "--snapshot-update")
    result.assert_outcomes(passed=2, failed=2)
    result.stdout.fnmatch_lines([expected])
    assert "INTERNALERROR" not in result.stdout.str()


def test_bitsandbytes_absent_is_a_platform_without_nf4(project):
    """Not installed at all: the nf4 items skip with that reason (a gate with nf4 goldens for this
    device class does not accept the skip: that rule lives in the session)."""
    project.suite("gen", SUITE)
    (project.path / "conftest.py").write_text("import sys\nsys.modules['bitsandbytes'] = None\n")
    result = project.run("--variants", "fp16,nf4", "--snapshot-update", "-rs")
    result.assert_outcomes(passed=2, skipped=2)
    result.stdout.fnmatch_lines(["*SKIPPED*NF4 is not available on CPU: bitsandbytes is not installed*"])


def _tiny_adapter(folder: Path, *, base_name: str, hidden: int, zero_b: bool = False) -> Path:
    """A real peft LoRA adapter for a small random Llama (another base model)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=30,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=49152)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.zero_() if zero_b else param.normal_()
    peft_model.save_pretrained(folder, safe_serialization=True)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = base_name
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


def test_adapter_for_another_base_model_names_both_models(project, tmp_path):
    adapter = _tiny_adapter(tmp_path / "other", base_name="tiny-llama-64", hidden=64)
    project.suite("gen", SUITE)
    result = project.run("--adapter", str(adapter), "--variants", "fp16-lora", "--snapshot-update")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines([
        "*Adapter *other (trained for base 'tiny-llama-64') does not fit model 'smollm2-135m'*size mismatch*",
    ])
    assert "Traceback" not in result.stdout.str()
    assert project.goldens() == []


def test_adapter_that_changes_nothing_is_refused(project, tmp_path):
    adapter = tmp_path / "noop"
    shutil.copytree(ADAPTER, adapter)
    from safetensors.torch import load_file, save_file

    weights = load_file(adapter / "adapter_model.safetensors")
    save_file({k: (v * 0 if "lora_B" in k else v) for k, v in weights.items()}, adapter / "adapter_model.safetensors")
    project.suite("gen", SUITE)
    result = project.run("--adapter", str(adapter), "--variants", "fp16,fp16-lora", "--snapshot-update")
    result.assert_outcomes(passed=2, failed=2)
    result.stdout.fnmatch_lines(["*did not load into 'smollm2-135m': 120 of 120 lora_B weights are still zero*"])


@pytest.mark.parametrize("broken", ["no_weights", "missing_layer", "every_lora_A", "config_is_a_list"])
def test_broken_adapter_folders(project, tmp_path, broken):
    adapter = tmp_path / broken
    shutil.copytree(ADAPTER, adapter)
    from safetensors.torch import load_file, save_file

    weights = load_file(adapter / "adapter_model.safetensors")
    if broken == "no_weights":
        (adapter / "adapter_model.safetensors").unlink()
        expected = "*no adapter_model.safetensors*"
    elif broken == "missing_layer":
        save_file({k: v for k, v in weights.items() if ".layers.7." not in k}, adapter / "adapter_model.safetensors")
        expected = "*did not load into 'smollm2-135m': 8 of the 240 tensors its LoRA layers need are missing*"
    elif broken == "every_lora_A":  # lora_B still non-zero: only the keys tell
        save_file({k: v for k, v in weights.items() if "lora_A" not in k}, adapter / "adapter_model.safetensors")
        expected = ("*did not load into 'smollm2-135m': 120 of the 240 tensors its LoRA layers need are missing "
                    "from the file (first: *lora_A*")
    else:
        (adapter / "adapter_config.json").write_text("[]")
        expected = "*adapter_config.json holds a list, not a mapping of settings*"
    project.suite("gen", SUITE)
    result = project.run("--adapter", str(adapter), "--variants", "fp16-lora", "--snapshot-update")
    if broken in ("no_weights", "config_is_a_list"):  # seen in the folder: one usage error before anything loads
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines([f"ERROR: --adapter {adapter}: {expected}"])
    else:  # seen only when the adapter loads into the model: each item fails with the reason
        result.assert_outcomes(failed=2)
        result.stdout.fnmatch_lines([expected])
    assert "INTERNALERROR" not in result.stdout.str() and "Traceback" not in result.stdout.str()


@pytest.mark.parametrize(("raised", "outcome"), [
    (NotImplementedError("Could not run 'bitsandbytes::quantize_4bit' with arguments from the 'XLA' backend"),
     "skip"),
    (RuntimeError("CUDA error: no kernel image is available for execution on the device"), "fail"),
    (OSError("libbitsandbytes_cuda128.so: cannot open shared object file"), "fail"),
], ids=["no-kernel-for-device", "kernel-fails", "library-missing"])
def test_nf4_probe_tells_a_platform_from_a_broken_install(monkeypatch, raised, outcome):
    import bitsandbytes.functional as bnbf

    import harness.models.pool as pool
    from harness.models.devices import Device
    from harness.errors import ModelLoadError

    def quantize(*args, **kwargs):
        raise raised

    monkeypatch.setattr(bnbf, "quantize_4bit", quantize)
    monkeypatch.setattr(pool, "_NF4_PROBE", {})
    cpu = Device("cpu", "cpu", "CPU")
    if outcome == "skip":
        assert "no NF4 kernel for cpu (NotImplementedError: Could not run" in pool.nf4_unsupported_reason(cpu)
    else:
        with pytest.raises(ModelLoadError, match=type(raised).__name__):
            pool.nf4_unsupported_reason(cpu)
        with pytest.raises(ModelLoadError):  # remembered: every nf4 item fails the same way
            pool.nf4_unsupported_reason(cpu)
