"""The default suites on a model the harness has never seen: a Qwen2-architecture folder.

Random weights are enough here: what is under test is that every check kind records and then
reproduces its goldens for another architecture, not what the model says.
"""

from __future__ import annotations

import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BEHAVIOUR_SUITES = ("generation", "tokenization", "chat_template", "padding", "consistency", "expectations")


def _tiny_qwen2(folder: Path, tokenizer_dir: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def test_default_suites_on_a_new_model_record_then_pass(project, embedded_model_dir, tmp_path):
    model = _tiny_qwen2(tmp_path / "tiny-qwen2", embedded_model_dir)
    for name in BEHAVIOUR_SUITES:
        shutil.copy(REPO / "suites" / f"{name}.yaml", project.path / "suites" / f"{name}.yaml")
    golden = tmp_path / "empty-golden"
    args = (f"--model={model}", f"--golden-dir={golden}", "--variants", "fp16,nf4")
    first = project.run(*args)
    assert first.parseoutcomes().get("failed", 0) > 0 and not golden.exists()
    update = project.run(*args, "--snapshot-update")
    outcomes = update.parseoutcomes()
    assert outcomes.get("failed", 0) == 0 and outcomes["passed"] > 10, update.stdout.str()[-3000:]
    recorded = sorted(str(p.relative_to(golden)) for p in golden.rglob("*.json") if ".meta." not in p.name)
    assert "tiny-qwen2/cpu/nf4/generation/chicken-joke.json" in recorded
    assert "tiny-qwen2/tokenizer/chat_template/builtin-conversations.json" in recorded
    rerun = project.run(*args, "-rs", "-v")
    rerun_outcomes = rerun.parseoutcomes()
    assert rerun_outcomes["passed"] == outcomes["passed"] and "failed" not in rerun_outcomes
    # self-consistency holds for any model; what one model answers does not
    rerun.stdout.fnmatch_lines(["*consistency.yaml::batch-rows?fp16? PASSED*", "*consistency.yaml::kv-cache?nf4? PASSED*"])
    rerun.stdout.fnmatch_lines(["*capital-paris was written for smollm2-135m*not for tiny-qwen2*"])


def _tiny_gemma2(folder: Path, tokenizer_dir: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, Gemma2Config, Gemma2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=512, sliding_window=64,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    Gemma2ForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


KERNELS_SUITE = """
suite: kernels
checks:
  - id: default-kernels
    kind: kernels
    prompts: ["Hello"]
    max_new_tokens: 2
  - id: needs-sdpa
    kind: kernels
    prompts: ["Hello"]
    max_new_tokens: 2
    require: [sdpa]
"""


def test_kernels_on_an_architecture_with_one_attention_implementation(project, embedded_model_dir, tmp_path):
    """Gemma 2 declares no sdpa: with eager only on a CPU there is nothing to compare, which is the
    model's design (a skip saying so), unless the suite requires sdpa (a failure naming why)."""
    model = _tiny_gemma2(tmp_path / "tiny-gemma2", embedded_model_dir)
    project.suite("kernels", KERNELS_SUITE)
    result = project.run(f"--model={model}", "--variants", "fp16", "-rs")
    result.assert_outcomes(skipped=1, failed=1)
    result.stdout.fnmatch_lines([
        "*needs-sdpa: required attention implementation(s) unavailable: sdpa: Gemma2ForCausalLM does not support it*",
        "SKIPPED*default-kernels: only ?'eager'? attention implementation(s) exist for this model here*"
        "sdpa: Gemma2ForCausalLM does not support it (_supports_sdpa is False in transformers)*",
    ])
