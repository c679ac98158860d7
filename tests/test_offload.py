"""Models larger than memory: accelerate's device_map spreads the model over devices and disk.

Goldens recorded with the whole model in memory must judge a run whose layers partly live on
disk (same dtype, same arithmetic); NF4, which cannot be offloaded, fails with its own reason.
"""

from __future__ import annotations

import re

import pytest

from harness.models.placement import Placement, check_max_memory, parse_max_memory

GEN = """
suite: gen
checks:
  - id: capital
    kind: greedy
    prompt: "The capital of France is"
    max_new_tokens: 4
  - id: joke
    kind: greedy
    messages:
      - {role: user, content: "Create a funny joke about chickens."}
    max_new_tokens: 4
"""


def test_goldens_recorded_in_memory_pass_with_part_of_the_model_on_disk(project, tmp_path):
    project.suite("gen", GEN)
    project.record("--variants", "fp16,fp16-lora", passed=4)
    result = project.run("--variants", "fp16,fp16-lora", "--max-memory", "cpu=150MiB",
                         "--offload-folder", str(tmp_path / "offload"))
    out = result.stdout.str()
    result.assert_outcomes(passed=4)
    # the summary says where the weights were
    held = re.findall(r"^loaded (fp16(?:-lora)?): 1x, .*\(held on cpu ([\d.]+) MiB, disk ([\d.]+) MiB\)$", out, re.M)
    assert sorted(key for key, _, _ in held) == ["fp16", "fp16-lora"], out
    assert all(float(cpu) <= 150 and float(disk) > 50 for _, cpu, disk in held)


def test_what_cannot_run_offloaded_fails_with_its_reason(project):
    """NF4 that does not fit is never faked with 16-bit layers; an embedding on disk cannot take inputs."""
    project.suite("gen", GEN)
    result = project.run("--variants", "fp16,nf4", "--max-memory", "cpu=60MiB", "-k", "capital")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines([
        "*fp16: 'smollm2-135m' with device_map auto (cpu=60MiB, offload folder *): its first weights (the input "
        "embedding) were offloaded to disk, and generation needs them in memory*",
        "*nf4: 'smollm2-135m' in NF4 does not fit device_map auto (cpu=60MiB, offload folder *)*NF4 cannot be "
        "offloaded (transformers refused to load it)*",
    ])


def test_placement_from_the_registry_and_the_command_line():
    assert check_max_memory({0: "20GiB", "cpu": "60 GB", "disk": 10**12}) == {0: "20GiB", "cpu": "60 GB", "disk": 10**12}
    assert parse_max_memory("cpu=150MiB, 1=8GiB") == {"cpu": "150MiB", 1: "8GiB"}
    for bad in ({"gpu": "1GiB"}, {"cpu": "lots"}, {"cpu": True}, {}):
        with pytest.raises(ValueError):
            check_max_memory(bad)
    with pytest.raises(ValueError, match="a GPU, but this session runs on the CPU"):
        Placement(max_memory={0: "1GiB"}).from_pretrained_kwargs("cpu")
    assert Placement(max_memory={"cpu": "1GiB"}).from_pretrained_kwargs("cpu")["max_memory"] == {"cpu": "1GiB"}


def test_bad_placement_values_are_usage_errors(project):
    project.suite("gen", GEN)
    result = project.run("--max-memory", "cpu:150MiB")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--max-memory 'cpu:150MiB': write DEVICE=SIZE pairs*"])
    (project.path / "models.yaml").write_text(
        (project.path / "models.yaml").read_text().replace("    chat: true\n", "    chat: true\n    max_memory: {cpu: lots}\n", 1))
    result = project.run("--collect-only")
    assert result.ret != 0
    assert "max_memory[cpu] = 'lots'" in result.stdout.str() + result.stderr.str()


def test_which_device_held_what_comes_from_the_device_map():
    """A tiny model with tied embeddings: each weight counted once, where the map puts its module."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from harness.measure.footprint import MemoryFigures
    from harness.measure import PeakMemory
    from harness.models.placement import placement_bytes

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).to(torch.float16)
    assert placement_bytes(model) is None  # not dispatched
    model.hf_device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                           "model.norm": "disk", "model.rotary_emb": "disk", "lm_head": "cpu"}
    held = placement_bytes(model)

    def size(module):
        return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))

    assert held == {"cpu": size(model.model.embed_tokens) + size(model.model.layers[0]),  # lm_head: tied
                    "disk": size(model.model.layers[1]) + size(model.model.norm) + size(model.model.rotary_emb)}
    figures = MemoryFigures(variant="fp16", weights_bytes=sum(held.values()), generated_tokens=1,
                            peak=PeakMemory(source="rss", peak_bytes=1, baseline_bytes=0), placement=held).figures()
    assert figures["weights_held_on"].startswith("cpu ") and ", disk " in figures["weights_held_on"]
    assert {"weights_on_cpu_mb", "weights_on_disk_mb"} <= set(figures)
