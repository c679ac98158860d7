"""Budget checks (memory, throughput, drift) on the real embedded model, and their pure logic.

Suites run in a subprocess (``runpytest_subprocess``) so that each test gets a fresh
pool and fresh process memory. Figures are read back from JUnit properties, where
``ctx.record`` puts them.
"""

from __future__ import annotations

import json
import shutil
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from conftest import Project

ROOT = Path(__file__).resolve().parent.parent
PIRATE = ROOT / "fixtures" / "adapters" / "smollm2-135m-pirate"


# -- helpers ---------------------------------------------------------------------------------
def _suite(project: Project, text: str) -> None:
    project.suite("budgets", textwrap.dedent(text))


def _run(project: Project, *args: str) -> pytest.RunResult:
    return project.run("--device", "cpu", "-rA", "--junitxml", str(project.path / "junit.xml"), *args)


def _figures(project: Project) -> dict[str, dict[str, str]]:
    tree = ET.parse(project.path / "junit.xml")
    return {case.get("name", ""): {p.get("name", ""): p.get("value", "") for p in case.iter("property")}
            for case in tree.iter("testcase")}


def _adapter(tmp: Path, *, zero: str) -> Path:
    """A no-op copy of the pirate adapter: its ``lora_A`` or ``lora_B`` matrices set to zero.

    It lives inside the pytester folder: a path argument outside it would move pytest's rootdir.
    """
    import torch
    from safetensors.torch import load_file, save_file

    out = tmp / f"noop-{zero}"
    out.mkdir()
    if (PIRATE / "adapter_model.safetensors").is_file():
        shutil.copy(PIRATE / "adapter_config.json", out / "adapter_config.json")
        tensors = load_file(str(PIRATE / "adapter_model.safetensors"))
    else:  # the fixture is not built here: make a small LoRA on the model with peft
        tensors = _fresh_lora(out)
    tensors = {k: torch.zeros_like(v) if zero in k else v for k, v in tensors.items()}
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


def _fresh_lora(out: Path) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from harness.models.registry import load_registry
    from harness.models.sources import resolve

    resolved = resolve(None, registry=load_registry(ROOT / "models.yaml"), rootdir=ROOT)
    model = AutoModelForCausalLM.from_pretrained(str(resolved.path), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.05)
    model.save_pretrained(str(out), safe_serialization=True)
    return load_file(str(out / "adapter_model.safetensors"))


# -- memory ------------------------------------------------------------------------------------
def test_memory_budget_too_small_fails_with_figure_and_budget(project: Project) -> None:
    _suite(project, """
        suite: budgets
        checks:
          - id: footprint
            kind: memory
            workload: {prompts: ["The capital of France is"], max_new_tokens: 2}
            budgets:
              smollm2-135m:
                cpu:
                  fp16: {max_weights_mb: 100, max_peak_mb: 100000}
          - id: unbudgeted
            kind: memory
            workload: {prompts: ["Hi"], max_new_tokens: 1}
            budgets:
              smollm2-135m:
                cuda-sm90:
                  fp16: {max_weights_mb: 1}
          - id: other-model
            kind: memory
            workload: {prompts: ["Hi"], max_new_tokens: 1}
            budgets:
              qwen-0.5b:
                cpu:
                  fp16: {max_weights_mb: 1}
          - id: gpu-only
            kind: memory
            devices: [cuda]
            workload: {prompts: ["Hi"], max_new_tokens: 1}
    """)
    result = _run(project, "--variants", "fp16")
    result.assert_outcomes(failed=1, skipped=3)
    result.stdout.fnmatch_lines([
        "*footprint[[]fp16[]] on cpu: memory budget not met:*",
        "*weights 256.* MB > max_weights_mb 100 (budgets.smollm2-135m.cpu.fp16; device class cpu, variant fp16)*",
    ])
    # nothing to judge is not a pass: a skip that says why, with the figures recorded
    result.stdout.fnmatch_lines([
        "SKIPPED*unbudgeted[[]fp16[]] on cpu: nothing judged: no budget for model 'smollm2-135m' on device "
        "class 'cpu', variant 'fp16'; figures recorded*",
    ])
    result.stdout.fnmatch_lines([
        "SKIPPED*other-model[[]fp16[]] on cpu: nothing judged: no budget for model 'smollm2-135m' (this check "
        "has budgets for: qwen-0.5b)*",
    ])
    figures = _figures(project)
    assert figures["unbudgeted[fp16]"]["peak_kind"] == "process RSS"
    assert float(figures["other-model[fp16]"]["weights_mb"]) > 200
    assert float(figures["footprint[fp16]"]["weights_mb"]) > 100
    # a GPU-only check skips with its reason on CPU
    result.stdout.fnmatch_lines(["SKIPPED*gpu-only runs on cuda only; this session runs on CPU*"])


def test_savings_ratio_and_drift_reference_come_from_the_same_session(project: Project) -> None:
    _suite(project, """
        suite: budgets
        checks:
          - id: footprint
            kind: memory
            workload: {prompts: ["The capital of France is", "Hello"], max_new_tokens: 2, batch_size: 2}
            budgets:
              smollm2-135m:
                cpu:
                  nf4: {max_weights_mb: 130}
            min_savings:
              - {variant: nf4, reference: fp16, metric: weights, ratio: 2.0}
          - id: footprint-strict
            kind: memory
            workload: {prompts: ["Hi"], max_new_tokens: 1}
            min_savings:
              - {variant: nf4, reference: fp16, metric: weights, ratio: 10}
          - id: drift
            kind: drift
            prompts: ["The capital of France is"]
            new_tokens: 4
            budgets:
              smollm2-135m:
                nf4: {max_mean_kl: 0.0001}
          - id: speed-ratio
            kind: throughput
            prompt_tokens: 4
            new_tokens: 2
            rounds: 1
            warmup_rounds: 0
            min_ratios:
              - {variant: nf4, reference: fp16, metric: decode, ratio: 1000}
    """)
    result = _run(project, "--variants", "fp16,nf4")
    # fp16 items: footprint (no fp16 budget) and footprint-strict judge nothing; speed-ratio[fp16] neither;
    # drift[fp16] is the reference
    result.assert_outcomes(passed=1, failed=3, skipped=4)
    figures = _figures(project)
    nf4 = figures["footprint[nf4]"]
    # measured against what NF4 should weigh for this model's own layer shapes (bitsandbytes' real bytes)
    assert float(nf4["expected_nf4_mb"]) == pytest.approx(float(nf4["weights_with_quant_state_mb"]), rel=0.02)
    result.stdout.fnmatch_lines([
        "*footprint-strict[[]nf4[]] on cpu: memory budget not met:*",
        "*nf4 saves only 2.*x weights vs fp16 (256.* MB / 10*.* MB, both measured in this session), below "
        "min_savings ratio 10 (device class cpu, variant nf4)*",
    ])
    result.stdout.fnmatch_lines([
        "*drift[[]nf4[]] on cpu: drift from fp16 out of budget:*",
        "*mean KL(fp16 || nf4) * > max_mean_kl 0.0001 (budgets.smollm2-135m.nf4; device class cpu, variant nf4)*",
        "*mean KL *, max KL *, top-1 agreement * over * positions*",
    ])
    result.stdout.fnmatch_lines([
        "*speed-ratio[[]nf4[]] on cpu: throughput budget not met*",
        "*decode is *x fp16 (* vs * tokens/s, same session), below min ratio 1000*",
    ])
    assert figures["drift[fp16]"]["reference_for"] == "nf4,fp16-lora"
    # each variant loaded once: references were memoized, not reloaded
    result.stdout.fnmatch_lines(["loaded fp16: 1x*", "loaded nf4: 1x*"])


def test_savings_relative_to_the_expectation_catch_a_layer_left_unquantized(project: Project) -> None:
    """o_proj left at 16 bits adds ~15 MB: under a 121 MB absolute budget, but not what NF4 predicts."""
    _suite(project, """
        suite: budgets
        checks:
          - id: footprint
            kind: memory
            workload: {prompts: ["Hi"], max_new_tokens: 1}
            budgets:
              smollm2-135m:
                cpu:
                  nf4: {max_weights_mb: 121}
            min_savings:
              - {variant: nf4, reference: fp16, metric: weights, of_expected: 0.95, max_of_expected: 1.05}
    """)
    (project.path / "conftest.py").write_text(
        "import harness.models.pool\n"
        "_config = harness.models.pool.nf4_config\n"
        "def _leave_o_proj():\n"
        "    config = _config()\n"
        "    config.llm_int8_skip_modules = ['o_proj', 'lm_head']\n"
        "    return config\n"
        "harness.models.pool.nf4_config = _leave_o_proj\n"
    )
    result = _run(project, "--variants", "fp16,nf4")
    result.assert_outcomes(failed=1, skipped=1)
    result.stdout.fnmatch_lines([
        "*footprint[[]nf4[]] on cpu: memory budget not met:*",
        "*nf4 saves 2.*x weights vs fp16 (*), 0.* of the 2.4*x this model's layer shapes predict*"
        "below of_expected 0.95 (device class cpu, variant nf4)*",
    ])
    assert "max_weights_mb" not in result.stdout.str()  # the absolute budget alone would have passed it
    assert float(_figures(project)["footprint[nf4]"]["saving_of_expected_vs_fp16"]) < 0.95


def test_default_budgets_judge_an_unseen_model_by_what_holds_for_any_model(
        project: Project, embedded_model_dir: Path, tmp_path: Path) -> None:
    """suites/budgets.yaml on a correct Qwen2-architecture model it has no budgets for: no red, no false green."""
    from test_other_model import _tiny_qwen2

    model = _tiny_qwen2(tmp_path / "tiny-qwen2", embedded_model_dir)
    shutil.copy(ROOT / "suites" / "budgets.yaml", project.path / "suites" / "budgets.yaml")
    result = _run(project, f"--model={model}", "--variants", "fp16,nf4")
    # only the savings of nf4 against its expectation apply to a model the suite was not written for
    result.assert_outcomes(passed=1, skipped=5)
    result.stdout.fnmatch_lines([
        "SKIPPED*footprint[[]fp16[]] on cpu: nothing judged: no budget for model 'tiny-qwen2' (this check has "
        "budgets for: smollm2-135m)*",
        "SKIPPED*speed-smoke[[]nf4[]] on cpu: nothing judged: no budget for model 'tiny-qwen2'*",
    ])
    nf4 = _figures(project)["footprint[nf4]"]
    assert 0.95 <= float(nf4["saving_of_expected_vs_fp16"]) <= 1.05
    # this model is all embedding and head: its right saving is nowhere near smollm2's 2.3x
    assert float(nf4["expected_saving_vs_fp16"]) < 1.1


# -- the same check id in two suites -------------------------------------------------------------
def test_two_suites_with_the_same_drift_id_measure_their_own_prompts(project: Project) -> None:
    for name, prompt in (("first", "The capital of France is"),
                         ("second", "Once upon a time, in a small village by the sea, there lived")):
        project.suite(name, textwrap.dedent(f"""
            suite: {name}
            checks:
              - id: drift
                kind: drift
                prompts: ["{prompt}"]
                new_tokens: 3
                budgets:
                  smollm2-135m:
                    nf4: {{max_mean_kl: 100}}
        """))
    result = _run(project, "--variants", "fp16,nf4")
    result.assert_outcomes(passed=2, skipped=2)
    tree = ET.parse(project.path / "junit.xml")
    drift = {("first" if "first" in case.get("classname", "") else "second"):
             {p.get("name"): p.get("value") for p in case.iter("property")}
             for case in tree.iter("testcase") if case.get("name") == "drift[nf4]"}
    assert set(drift) == {"first", "second"}
    assert drift["first"]["positions"] != drift["second"]["positions"]
    assert drift["first"]["mean_kl"] != drift["second"]["mean_kl"]


# -- drift: adapters ----------------------------------------------------------------------------
DRIFT_SUITE = """
    suite: budgets
    checks:
      - id: adapter-drift
        kind: drift
        prompts: ["The capital of France is"]
        chats:
          - [{role: user, content: "Tell me a joke."}]
        new_tokens: 4
"""


def test_noop_adapter_fails_the_drift_check(project: Project) -> None:
    _suite(project, DRIFT_SUITE)
    noop = _adapter(project.path, zero="lora_A")  # lora_B non-zero: the pool's load check cannot see it
    result = _run(project, "--variants", "fp16,fp16-lora", "--adapter", str(noop))
    result.assert_outcomes(skipped=1, failed=1)  # drift[fp16] is the reference: it judges nothing
    result.stdout.fnmatch_lines([
        "*adapter-drift[[]fp16-lora[]] on cpu: drift from fp16 out of budget:*",
        "*the adapter changes nothing measurable: mean KL(fp16 || fp16-lora) = 0 over * positions "
        "(minimum 0.0001), top-1 agreement 1.0000*",
    ])


def test_adapter_with_zero_lora_b_fails_before_drift(project: Project) -> None:
    _suite(project, DRIFT_SUITE)
    noop = _adapter(project.path, zero="lora_B")
    result = _run(project, "--variants", "fp16,fp16-lora", "--adapter", str(noop))
    result.assert_outcomes(skipped=1, failed=1)  # drift[fp16] is the reference: it judges nothing
    result.stdout.fnmatch_lines(["*did not load*lora_B weights are still zero*no-op*"])


# -- throughput -------------------------------------------------------------------------------------
THROUGHPUT_SUITE = """
    suite: budgets
    checks:
      - id: speed
        kind: throughput
        batch: 1
        prompt_tokens: 8
        new_tokens: 3
        rounds: 2
        warmup_rounds: 1
        budgets:
          smollm2-135m:
            cpu:
              fp16: {min_decode_tokens_per_s: 0.001, min_prefill_tokens_per_s: 0.001}
      - id: impossible
        kind: throughput
        prompt_tokens: 4
        new_tokens: 2
        rounds: 1
        warmup_rounds: 0
        budgets:
          smollm2-135m:
            cpu:
              fp16: {min_decode_tokens_per_s: 1.0e9}
"""


def test_throughput_lands_in_benchmark_json(project: Project) -> None:
    _suite(project, THROUGHPUT_SUITE)
    out = project.path / "bench.json"
    result = _run(project, "--variants", "fp16", f"--benchmark-json={out}")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([
        "*impossible[[]fp16[]] on cpu: throughput budget not met (CPU speed):*",
        "*decode * tokens/s < min_decode_tokens_per_s 1e+09 (budgets.smollm2-135m.cpu.fp16; device class cpu, "
        "variant fp16;*pytest-benchmark)*",
    ])
    data = json.loads(out.read_text())
    bench = {b["name"]: b for b in data["benchmarks"]}
    speed = bench["speed[fp16]"]
    assert speed["stats"]["rounds"] == 2
    info = speed["extra_info"]
    assert (info["variant"], info["device_class"], info["prompt_tokens"], info["new_tokens"]) == ("fp16", "cpu", 8, 3)
    # the figures are pytest-benchmark's own rounds: its median prefill is not longer than a whole round
    assert info["prefill_ms"] / 1000 <= speed["stats"]["median"]
    assert speed["group"].startswith("budgets::speed")


@pytest.mark.parametrize("switch", [("--benchmark-disable",), ("-n", "2")], ids=["benchmark-disable", "xdist"])
def test_impossible_floor_fails_when_pytest_benchmark_is_off(project: Project, switch: tuple[str, ...]) -> None:
    """pytest-benchmark switches itself off under xdist; the floors are judged on the harness's clock."""
    _suite(project, THROUGHPUT_SUITE)
    result = _run(project, "--variants", "fp16", *switch)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([
        "*impossible[[]fp16[]] on cpu: throughput budget not met (CPU speed):*",
        "*decode * tokens/s < min_decode_tokens_per_s 1e+09 *harness per-step clock (pytest-benchmark disabled*",
    ])
    figures = _figures(project)
    assert figures["speed[fp16]"]["rounds"] == "2"  # the suite's rounds, not one cold round


# -- pure logic (no model) --------------------------------------------------------------------------
def test_nf4_bits_per_weight_is_what_bitsandbytes_stores() -> None:
    """The constant against bitsandbytes' own output: packed codes + absmax + nested constants."""
    import bitsandbytes.functional as bnbf
    import torch

    from harness.measure import NF4_BITS_PER_WEIGHT

    weights = torch.randn(256, 256 * 4, dtype=torch.bfloat16)
    packed, state = bnbf.quantize_4bit(weights, quant_type="nf4", compress_statistics=True)
    stored = [packed, state.absmax, state.state2.absmax]
    bits = 8 * sum(t.numel() * t.element_size() for t in stored) / weights.numel()
    assert bits == pytest.approx(NF4_BITS_PER_WEIGHT, rel=1e-3)


def test_nf4_estimate_counts_linear_layers_not_the_head() -> None:
    from transformers import LlamaConfig

    from harness.measure import nf4_estimate

    hidden, inter, vocab, layers = 64, 128, 1000, 2
    per_layer = hidden * hidden * 2 + hidden * 32 * 2 + hidden * inter * 3  # q,o + k,v (2 kv heads) + mlp
    norms = layers * 2 * hidden + hidden
    for tied in (True, False):
        config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                             num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                             tie_word_embeddings=tied)
        est = nf4_estimate(config)
        assert est.quantized_weights == layers * per_layer
        assert est.other_params == vocab * hidden * (1 if tied else 2) + norms  # lm_head stays 16-bit
        # the 16-bit twin holds every parameter once, at 2 bytes
        assert est.sixteen_bit_bytes == 2 * (layers * per_layer + vocab * hidden * (1 if tied else 2) + norms)
        assert est.total_bytes < est.sixteen_bit_bytes


@pytest.mark.parametrize(("entry", "message"), [
    ("{variant: nf4, reference: fp16}", "exactly one of `ratio`"),
    ("{variant: nf4, reference: fp16, ratio: 2, of_expected: 0.9}", "exactly one of `ratio`"),
    ("{variant: fp16-lora, reference: fp16, of_expected: 0.9}", "an nf4 variant with its 16-bit twin"),
    ("{variant: nf4, reference: fp16, metric: peak, of_expected: 0.9}", "an nf4 variant with its 16-bit twin"),
    ("{variant: nf4, reference: fp16, ratio: 2, max_of_expected: 1.1}", "goes with `of_expected`"),
], ids=["neither", "both", "not-nf4", "peak", "max-alone"])
def test_savings_entries_say_what_they_compare(tmp_path: Path, entry: str, message: str) -> None:
    from harness.errors import SuiteError
    from harness.suites.spec import load_suite

    path = tmp_path / "suites" / "bad.yaml"
    path.parent.mkdir()
    path.write_text(f"suite: bad\nchecks:\n  - id: x\n    kind: memory\n    workload: {{prompts: [hi]}}\n"
                    f"    min_savings:\n      - {entry}\n")
    with pytest.raises(SuiteError) as err:
        load_suite(path)
    assert message in str(err.value)


def test_budget_lookup_prefers_the_exact_device_class_of_the_model() -> None:
    from harness.checks.budgets import budget_for, device_keys

    assert device_keys("cuda-sm90") == ["cuda-sm90", "cuda", "any"]
    table = {"m": {"cuda": {"nf4": 1}, "cuda-sm90": {"nf4": 2}, "any": {"fp16": 3}}, "other": {"cpu": {"nf4": 4}}}
    assert budget_for(table, model="m", device_class="cuda-sm90", variant="nf4") == (2, "m.cuda-sm90.nf4")
    assert budget_for(table, model="m", device_class="cuda-sm80", variant="nf4") == (1, "m.cuda.nf4")
    assert budget_for(table, model="m", device_class="cpu", variant="fp16") == (3, "m.any.fp16")
    assert budget_for(table, model="m", device_class="cpu", variant="nf4") == (None, None)
    assert budget_for(table, model="unlisted", device_class="cpu", variant="nf4") == (None, None)


def test_peak_memory_refuses_shared_gpus_under_xdist(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from harness.models.devices import Device
    from harness.measure import parallel_conflict, parallel_note

    gpu = Device("cuda:0", "cuda-sm90", "NVIDIA H100 (cuda:0)")
    cpu = Device("cpu", "cpu", "CPU")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.delenv("PYTEST_XDIST_WORKER_COUNT", raising=False)
    assert parallel_conflict(gpu) is None
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    reason = parallel_conflict(gpu)
    assert reason is not None and "2 pytest-xdist workers share 1 GPU(s)" in reason
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert parallel_conflict(gpu) is None  # one worker per GPU
    assert parallel_conflict(cpu) is None
    assert "this pytest-xdist worker only" in (parallel_note(cpu) or "")


def test_rss_sampler_sees_a_transient_allocation() -> None:
    from harness.models.devices import Device
    from harness.measure import measure_peak

    def allocate() -> int:
        import time

        block = bytearray(200 * 2**20)
        for i in range(0, len(block), 4096):
            block[i] = 1
        time.sleep(0.05)
        return len(block)

    _, peak = measure_peak(allocate, device=Device("cpu", "cpu", "CPU"))
    assert peak.label == "process RSS"
    assert peak.peak_bytes - peak.baseline_bytes > 150 * 2**20


@pytest.mark.parametrize(("kind", "fragment", "message"), [
    ("memory", "workload: {prompts: [hi]}\n    budgets: {cpu: {nf4: {max_weights_mb: 1}}}",
     "'cpu' is a device class where a model name belongs"),
    ("memory", "workload: {prompts: [hi]}\n    budgets: {m: {nf4: {max_weights_mb: 1}}}",
     "'nf4' is not a device class"),
    ("memory", "workload: {prompts: [hi]}\n    budgets: {m: {cpu: {nf5: {max_weights_mb: 1}}}}",
     "did you mean 'nf4'"),
    ("throughput", "budgets: {m: {cpu: {fp16: {min_decode_tokens_per_sec: 1}}}}", "unknown key"),
    ("drift", "prompts: [hi]\n    budgets: {m: {cpu: {max_mean_kl: 1}}}", "device_budgets"),
    ("drift", "prompts: [hi]\n    budgets: {nf4: {max_mean_kl: 1}}", "'nf4' is a variant where a model name belongs"),
    ("drift", "budgets: {m: {nf4: {max_mean_kl: 1}}}", "give at least one of 'prompts'"),
    ("throughput", "new_tokens: 1", "greater than or equal to 2"),
    ("throughput", "budgets: {m: {cpu: {fp16: {}}}}", "an empty budget judges nothing"),
    ("drift", "prompts: [hi]\n    budgets: {m: {nf4: {}}}", "an empty budget judges nothing"),
], ids=["device-at-model-level", "variant-at-device-level", "misspelled-variant", "misspelled-budget-key",
        "drift-device-budget", "drift-without-model", "drift-without-prompts", "one-new-token",
        "empty-throughput-budget", "empty-drift-budget"])
def test_budget_specs_are_validated(tmp_path: Path, kind: str, fragment: str, message: str) -> None:
    from harness.errors import SuiteError
    from harness.suites.spec import load_suite

    path = tmp_path / "suites" / "bad.yaml"
    path.parent.mkdir()
    path.write_text(f"suite: bad\nchecks:\n  - id: x\n    kind: {kind}\n    {fragment}\n")
    with pytest.raises(SuiteError) as err:
        load_suite(path)
    assert message in str(err.value)
    assert "bad.yaml:" in str(err.value)
