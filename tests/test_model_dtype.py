"""Half precision as models ship: the fp16 variants run in the model's own 16-bit dtype, and NaN logits fail.

The model under test here is built to overflow float16 the way a model trained in bfloat16 can: a
tiny random Llama saved in bfloat16 whose MLP activations reach about 1e7 (weights within float16's
range, products beyond its 65504). In bfloat16 it runs; in float16 every logit is NaN.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from harness.models.logits_guard import LogitsGuard, NonFiniteLogits, Precision, message
from harness.models.registry import ModelEntry, load_registry
from harness.models.sources import config_dtype, half_precision

REPO = Path(__file__).resolve().parents[1]

SUITE = """
suite: half
checks:
  - id: capital
    kind: greedy
    prompt: "The capital of France is"
    max_new_tokens: 4
  - id: padded
    kind: padding
    prompts: ["Hi", "The capital of France is"]
    max_new_tokens: 2
"""


def overflow_llama(folder: Path, *, dtype: str = "bfloat16", overflow: bool = True) -> Path:
    """A tiny Llama saved in ``dtype`` whose MLP products overflow float16 (about 1e7; ``overflow=False``: an
    ordinary one), with a random adapter beside it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from harness.models.synthetic import SPECIAL_TOKEN, byte_tokenizer, save_random_adapter

    tokenizer = byte_tokenizer()
    special = tokenizer.convert_tokens_to_ids(SPECIAL_TOKEN)
    config = LlamaConfig(vocab_size=special + 1, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=special, eos_token_id=special, pad_token_id=special, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers if overflow else ():
            layer.post_attention_layernorm.weight.fill_(200.0)  # the MLP's input: about 200 per element
            layer.mlp.gate_proj.weight.normal_(0, 1.0)  # gate and up: about 1600 each, their product 1e6-1e7
            layer.mlp.up_proj.weight.normal_(0, 1.0)
            layer.mlp.down_proj.weight.normal_(0, 1e-3)  # back to the residual stream's scale
        model.lm_head.weight.normal_(0, 1.0)  # decisive logits: goldens that are not all near-ties
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    save_random_adapter(model, folder.parent / f"{folder.name}-lora")
    return folder


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return overflow_llama(tmp_path_factory.mktemp("overflow") / "overflow-llama")


def _load(folder: Path, dtype: str) -> Any:
    import torch
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(folder), dtype=getattr(torch, dtype)).eval()


def _precision(dtype: str, **kw: Any) -> Precision:
    return Precision(model="overflow-llama", variant="fp16", dtype=dtype, why="config.json says bfloat16",
                     shipped="bfloat16", **kw)


# -- which dtype: config.json, the registry entry, the embedded model ---------------------------------

@pytest.mark.parametrize("config, entry, expected", [
    ({"dtype": "bfloat16"}, None, ("bfloat16", "config.json says bfloat16")),
    ({"torch_dtype": "bfloat16"}, None, ("bfloat16", "config.json says bfloat16")),  # transformers 4's key
    ({"dtype": "float16"}, None, ("float16", "config.json says float16")),
    ({"dtype": "float32"}, None, ("float16", "config.json says float32; float16 unless the registry entry sets dtype")),
    ({}, None, ("float16", "config.json names no dtype; float16 unless the registry entry sets dtype")),
    ({"dtype": "bfloat16"}, "float16", ("float16", "dtype: float16 in the registry entry")),
    ({"dtype": "float32"}, "bfloat16", ("bfloat16", "dtype: bfloat16 in the registry entry")),
])
def test_the_half_precision_follows_the_entry_then_config_json(tmp_path, config, entry, expected):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", **config}))
    half = half_precision(tmp_path, ModelEntry(path=str(tmp_path), dtype=entry))
    assert (half.dtype, half.why) == expected
    assert half.shipped == config_dtype(tmp_path) == (config.get("dtype") or config.get("torch_dtype"))


def test_an_unreadable_config_says_nothing_and_stays_float16(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    assert half_precision(tmp_path, ModelEntry(path=str(tmp_path))).dtype == "float16"


@pytest.mark.parametrize("value, hint", [("float32", "."), ("bf16", "; did you mean 'bfloat16'?"),
                                         ("fp16", "; did you mean 'float16'?"), ("16", ".")])
def test_a_bad_dtype_gets_one_paragraph_naming_line_key_and_choices(tmp_path, value, hint):
    from harness.errors import SuiteError

    path = tmp_path / "models.yaml"
    path.write_text(f"default: a\nmodels:\n  a:\n    path: {tmp_path}\n    dtype: {value}\n")
    with pytest.raises(SuiteError) as info:
        load_registry(path)
    text = str(info.value)
    assert text.startswith(f"{path}:5: models.a.dtype: not a 16-bit dtype the harness runs a model in{hint}")
    assert "float16 or bfloat16" in text and "config.json" in text and f"(you wrote '{value}')" in text
    assert "\n" not in text


def test_the_embedded_default_model_keeps_running_in_float16(embedded_model_dir):
    """Its committed goldens are float16 ones: the registry entry says so, and the converted GGUF's config.json
    (float32, the dequantized weights) would keep float16 even without it."""
    from harness.models.sources import resolve

    registry = load_registry(REPO / "models.yaml")
    assert registry.models["smollm2-135m"].dtype == "float16"
    resolved = resolve(None, registry=registry, rootdir=REPO)
    assert resolved.half.dtype == "float16"
    assert config_dtype(embedded_model_dir) != "bfloat16"
    assert half_precision(embedded_model_dir, ModelEntry(path=str(embedded_model_dir))).dtype == "float16"


def test_built_in_tolerances_follow_the_half_precision_and_float16_keeps_its_own():
    from harness.judge.allowance import widened_defaults
    from harness.judge.tolerance import BFLOAT16_TOLERANCE, DEFAULT_TOLERANCES, ToleranceSpec, layered

    assert layered(None, None).tolerance("fp16-lora") == DEFAULT_TOLERANCES["fp16"]  # nothing widened for float16
    assert layered(None, None, half="bfloat16").tolerance("fp16-lora") == BFLOAT16_TOLERANCE
    assert layered(None, None, half="bfloat16").tolerance("nf4") == DEFAULT_TOLERANCES["nf4"]
    check = ToleranceSpec.model_validate({"tie_gap": 0.5})
    tol = layered(None, check, half="bfloat16").tolerance("fp16")
    assert tol.source == "fp16 in bfloat16 (tie_gap set in the check)" and tol.mean_abs_dlogp == 0.12
    assert widened_defaults(tol) == ()  # 0.5 is below bfloat16's 0.75: narrower, not widened
    tol16 = layered(None, check).tolerance("fp16")
    assert widened_defaults(tol16) == ("tie_gap 0.5 (set in the check) is wider than the fp16 default 0.22",)


# -- the guard ----------------------------------------------------------------------------------------

def test_the_messages_name_the_dtype_and_the_fix():
    shipped_bf16 = message(_precision("float16"), what="NaN")
    assert "logits are NaN in float16 (config.json says bfloat16)" in shipped_bf16
    assert "ships in bfloat16" in shipped_bf16 and "Fix: set dtype: bfloat16 in its registry entry" in shipped_bf16
    unknown = message(Precision("m", "nf4", "float16", "config.json says float32", "float32", quantized=True),
                      what="infinite")
    assert "infinite in NF4 with bfloat16 compute and float16 elsewhere" in unknown
    assert "if the model was trained in bfloat16, run it in bfloat16" in unknown and "models.yaml" in unknown
    own = message(_precision("bfloat16"), what="NaN")
    assert "no overflow of a half precision" in own and "checkpoint's tensors for NaN/inf" in own


def test_float16_overflow_raises_in_the_forward_with_the_dtype_and_fix(bf16_model):
    import torch

    ids = torch.tensor([[72, 105, 33, 32, 84]])
    assert bool(torch.isfinite(_load(bf16_model, "bfloat16")(input_ids=ids).logits).all())
    model = _load(bf16_model, "float16")
    guard = LogitsGuard(_precision("float16"))
    assert guard.attach(model)
    with pytest.raises(NonFiniteLogits) as info:
        model(input_ids=ids)
    assert "logits are NaN (1285 of 1285 values in 1 row(s)) in float16" in str(info.value)
    assert "Fix: set dtype: bfloat16" in str(info.value) and guard.alarms == [info.value]
    with pytest.raises(NonFiniteLogits):  # decoding goes through the same head, step by step
        model.generate(input_ids=ids, max_new_tokens=2, do_sample=False)
    # a copy a check derives (a merge, a float32 arbiter) is that check's to judge: the guard stays behind
    clone = copy.deepcopy(model)
    assert not bool(torch.isfinite(clone(input_ids=ids).logits).all())
    guard.detach()
    model(input_ids=ids)  # no hooks left


def test_the_guard_sees_through_a_lora_adapter(bf16_model):
    import torch
    from peft import PeftModel

    model = _load(bf16_model, "float16")
    LogitsGuard(_precision("float16")).attach(model)
    lora = PeftModel.from_pretrained(model, str(bf16_model.parent / f"{bf16_model.name}-lora"))
    with pytest.raises(NonFiniteLogits):  # peft's forward calls the inner model's forward, not the model
        lora(input_ids=torch.tensor([[72, 105]]))


def test_padded_rows_are_left_to_the_padding_checks(bf16_model):
    import torch

    model = _load(bf16_model, "float16")
    LogitsGuard(_precision("float16")).attach(model)
    ids = torch.tensor([[256, 72, 105], [84, 104, 101]])
    with pytest.raises(NonFiniteLogits):  # row 1 has no padding
        model(input_ids=ids, attention_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]))
    model(input_ids=ids[:1], attention_mask=torch.tensor([[0, 1, 1]]))  # only padded rows: not the guard's call
    guard = LogitsGuard(_precision("bfloat16"))
    logits = torch.zeros(2, 3, 5)
    logits[1, 2, 0] = float("inf")
    guard.check(logits, torch.tensor([True, False]))
    with pytest.raises(NonFiniteLogits, match=r"logits are infinite \(1 of 15 values in 1 row\(s\)\)"):
        guard.check(logits, None)
    logits[1, 2, 0] = float("-inf")  # a token ruled out: still a distribution
    guard.check(logits, None)
    logits[0, 1] = float("-inf")  # no token possible at one position: none
    with pytest.raises(NonFiniteLogits, match=r"logits are -inf for every token \(1 position\)"):
        guard.check(logits, None)


# -- through the plugin: a bfloat16 model as it ships, and the same model forced to float16 -------------

def test_a_bfloat16_model_runs_in_bfloat16_and_forced_to_float16_fails_naming_the_fix(project, bf16_model):
    project.suite("half", SUITE)
    args = (f"--model={bf16_model}", f"--adapter={bf16_model.parent / (bf16_model.name + '-lora')}",
            "--variants", "fp16,fp16-lora,nf4")
    update = project.run(*args, "--snapshot-update")
    update.assert_outcomes(passed=6)
    update.stdout.fnmatch_lines(["loaded fp16: 1x, * bfloat16 weights * MiB",
                                 "loaded fp16-lora: 1x, * bfloat16 weights * MiB",
                                 "loaded nf4: 1x, * NF4 (bfloat16 compute, bfloat16 elsewhere) weights * MiB"])
    golden = project.golden / "overflow-llama" / "cpu" / "fp16" / "half" / "capital.json"
    assert "nan" not in golden.read_text().lower()
    project.run(*args, "--harness-report", "report.md").assert_outcomes(passed=6)
    report = (project.path / "report.md").read_text()
    assert "- 16-bit variants in bfloat16 (config.json says bfloat16); NF4 computes in bfloat16" in report

    registry = project.path / "models.yaml"
    registry.write_text(registry.read_text() + f"\n  forced:\n    path: {bf16_model}\n    dtype: float16\n")
    forced = project.run("--model=forced", *args[1:], "--snapshot-update")
    forced.assert_outcomes(failed=6)
    forced.stdout.fnmatch_lines([
        "forced [[]fp16]: the model's logits are NaN (*) in float16 (dtype: float16 in the registry entry), "
        "on an unpadded input, so nothing this variant scores can be judged or recorded. This model ships in "
        "bfloat16 (its config.json), and its activations overflow float16's range (65504). Fix: set dtype: "
        "bfloat16 in its registry entry*",
        "loaded fp16: 1x, * float16 weights * MiB",
    ])
    assert "in NF4 with bfloat16 compute and float16 elsewhere" in forced.stdout.str()
    assert not (project.golden / "forced" / "cpu").exists()  # --snapshot-update recorded nothing from NaN


def test_a_check_that_swallows_the_guard_still_fails(project, bf16_model):
    """However a check handles an exception in decoding (a skip, a not-judged), NaN logits fail the item."""
    project.suite("half", SUITE.split("  - id: padded")[0])
    project.pytester.makeconftest("""
import pytest
from harness.checks import greedy

_run = greedy.GreedyCheck.run


def swallowing(self, ctx):
    try:
        _run(self, ctx)
    except Exception as exc:
        pytest.skip(f"swallowed: {type(exc).__name__}")


greedy.GreedyCheck.run = swallowing
""")
    registry = project.path / "models.yaml"
    registry.write_text(registry.read_text() + f"\n  forced:\n    path: {bf16_model}\n    dtype: float16\n")
    result = project.run("--model=forced", "--variants", "fp16", "--snapshot-update")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["forced [[]fp16]: the model's logits are NaN * in float16*"])
    assert "swallowed" not in result.stdout.str()


def test_reference_mode_says_when_old_and_new_run_in_different_half_precisions(project, tmp_path):
    """The same weights, NEW in its own bfloat16 and OLD forced to float16: the summary says the dtypes differ."""
    folder = overflow_llama(tmp_path / "plain-llama", overflow=False)
    project.suite("half", SUITE.split("  - id: padded")[0])
    registry = project.path / "models.yaml"
    registry.write_text(registry.read_text() + f"\n  plain16:\n    path: {folder}\n    dtype: float16\n")
    result = project.run(f"--model={folder}", "--reference=plain16", "--variants", "fp16")
    result.stdout.fnmatch_lines([
        "NEW loaded fp16: 1x, * bfloat16 weights *",
        "OLD note: runs in float16 (dtype: float16 in the registry entry), NEW in bfloat16 (config.json says "
        "bfloat16): every 16-bit comparison judges the change of half precision together with the model's*",
        "OLD loaded fp16: 1x, * float16 weights *",
    ])
