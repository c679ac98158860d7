"""Bad input, command-line tools: every argument is checked before a model loads, a usage error exits 2 with
one paragraph, nothing prints a traceback, exit codes mean what the README says, and JSON output is strict.

Exit codes (harness/cli.py, README "Exit codes"): 0 done, 1 the tool's negative finding (diff: changed;
calibrate: no tolerance could be recommended; bench: a variant failed to load), 2 nothing could be done,
3 an unexpected error inside the harness, 130 interrupted. Examples found by trying the harness from outside are marked "example".
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

import harness.bench.run as bench
import harness.calibrate.calibration as calibration
import harness.calibrate.run as calibrate
import harness.diff.cli as diff_cli
import harness.diff.run as diff_run

REPO = Path(__file__).resolve().parents[1]
ADAPTER = REPO / "fixtures" / "adapters" / "smollm2-135m-pirate"
TOOLS = {"harness-diff": diff_cli.main, "harness-calibrate": calibrate.main, "harness-bench": bench.main}


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project folder with the registry; no model may load in these tests (each stand-in raises)."""
    shutil.copy(REPO / "models.yaml", tmp_path / "models.yaml")
    (tmp_path / "afile").write_text("I am a file")
    monkeypatch.chdir(tmp_path)

    def no_model(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(diff_run, "run_diff", no_model)
    monkeypatch.setattr(calibration, "run_calibration", no_model)
    monkeypatch.setattr(bench, "run_bench", no_model)
    return tmp_path


def _run(tool: str, argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        rc = TOOLS[tool](argv)
    except SystemExit as exc:  # argparse
        rc = int(exc.code or 0)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return rc, err


BAD = [
    # (tool, argv, words of the one-paragraph message)
    pytest.param("harness-diff", ["m1", "m2", "--out", "afile"], "--out afile: this is a file",
                 id="example: diff --out naming an existing file (was a traceback and exit 1)"),
    pytest.param("harness-diff", ["m1", "m2", "--new-tokens", "0"], "argument --new-tokens: 0 is below 1",
                 id="example: diff --new-tokens 0"),
    pytest.param("harness-diff", ["m1", "m2", "--max-prompts", "-2"], "argument --max-prompts: -2 is below 0",
                 id="diff --max-prompts negative"),
    pytest.param("harness-diff", ["m1", "m2", "--device", "tpu"], "argument --device: invalid choice",
                 id="diff --device unknown"),
    pytest.param("harness-diff", ["m1", "m2", "--registry", "."], "--registry .: this is a folder",
                 id="diff --registry a folder"),
    pytest.param("harness-diff", ["m1"], "the following arguments are required: NEW", id="diff without NEW"),
    pytest.param("harness-calibrate", ["--safety", "1e4"], "argument --safety: 1e4 is outside 1..100",
                 id="example: calibrate --safety huge"),
    pytest.param("harness-calibrate", ["--safety", "nan"], "argument --safety: nan is outside", id="calibrate --safety nan"),
    pytest.param("harness-calibrate", ["--safety", "0.5"], "below 1 a recommendation fails", id="calibrate --safety < 1"),
    pytest.param("harness-calibrate", ["--conditions", "kernel"], "unknown condition 'kernel'",
                 id="calibrate --conditions typo"),
    pytest.param("harness-calibrate", ["--env", "ATEN_CPU_CAPABILITY"], "expected NAME=VALUE", id="calibrate --env"),
    pytest.param("harness-calibrate", ["--regressions", "weights:inf"], "weights takes a finite number",
                 id="calibrate --regressions inf"),
    pytest.param("harness-calibrate", ["--max-new-tokens", "0"], "argument --max-new-tokens: 0 is below 1",
                 id="calibrate --max-new-tokens 0"),
    pytest.param("harness-calibrate", ["--variants", "fp8"], "unknown variant 'fp8'", id="calibrate --variants"),
    pytest.param("harness-calibrate", ["--attn-implementation", "fast"], "unknown attention implementation 'fast'",
                 id="calibrate --attn-implementation"),
    pytest.param("harness-calibrate", ["--out", "afile/x"], "afile is a file, not a folder", id="calibrate --out under a file"),
    pytest.param("harness-calibrate", ["nosuch-suites"], "nosuch-suites: no such suite file or folder",
                 id="calibrate suites missing"),
    pytest.param("harness-calibrate", ["--registry", "missing.yaml"], "--registry missing.yaml: no such file",
                 id="calibrate registry missing"),
    pytest.param("harness-bench", ["--new-tokens", "0"], "argument --new-tokens: 0 is below 2", id="bench --new-tokens 0"),
    pytest.param("harness-bench", ["--prompt", ""], "argument --prompt: an empty prompt", id="example: bench empty prompt"),
    pytest.param("harness-bench", ["--rounds", "0"], "argument --rounds: 0 is below 1", id="bench --rounds 0"),
    pytest.param("harness-bench", ["--batch", "two"], "argument --batch: 'two' is not a whole number", id="bench --batch"),
    pytest.param("harness-bench", ["--out", "afile"], "--out afile: this is a file", id="bench --out a file"),
    pytest.param("harness-bench", ["--adapter", "afile"], "--adapter afile: this is a file", id="bench --adapter a file"),
]


@pytest.mark.parametrize(("tool", "argv", "words"), BAD)
def test_a_bad_argument_exits_2_with_one_paragraph_before_a_model_loads(workdir, capsys, tool, argv, words):
    rc, err = _run(tool, argv, capsys)
    assert rc == 2, err
    assert words in err, err
    assert err.startswith(f"{tool}: ") and err.count("\n") == 1, err  # one paragraph, one line
    assert "Fix:" in err or "Nothing was run" in err


def _adapter_copy(tmp_path: Path, edit: Any) -> Path:
    folder = tmp_path / "adapter"
    shutil.copytree(ADAPTER, folder)
    edit(folder)
    return folder


@pytest.mark.parametrize(("edit", "words"), [
    pytest.param(lambda f: (f / "adapter_model.safetensors").unlink(), "no adapter_model.safetensors",
                 id="example: adapter folder without adapter_model.safetensors"),
    pytest.param(lambda f: (f / "adapter_model.safetensors").rename(f / "adapter_model.bin"),
                 "found adapter_model.bin: pickle adapters are refused", id="a pickle adapter"),
    pytest.param(lambda f: (f / "adapter_config.json").write_text("{}"), "has no peft_type",
                 id="adapter_config.json = {}"),
])
def test_an_unusable_adapter_side_of_a_diff_is_named(workdir, capsys, edit, words):
    adapter = _adapter_copy(workdir, edit)
    rc, err = _run("harness-diff", [str(ADAPTER), str(adapter), "--suites"], capsys)
    assert rc == 2 and "NEW: " in err and words in err, err


@pytest.mark.parametrize("tool", list(TOOLS))
def test_an_unexpected_error_exits_3_in_one_paragraph(workdir, capsys, monkeypatch, tool):
    def boom(*args: Any, **kwargs: Any) -> Any:
        raise KeyError("something the harness did not expect")

    monkeypatch.setattr(diff_run, "run_diff", boom)
    monkeypatch.setattr(calibration, "run_calibration", boom)
    monkeypatch.setattr(bench, "run_bench", boom)
    (workdir / "suites").mkdir()
    argv = {"harness-diff": ["old", "new", "--suites"]}.get(tool, [])
    monkeypatch.setattr(diff_cli, "resolve_side", lambda value, **kwargs: value)
    rc, err = _run(tool, argv, capsys)
    assert rc == 3, err
    assert f"{tool}: unexpected KeyError: 'something the harness did not expect' (a harness bug" in err
    assert "HARNESS_TRACEBACK=1" in err


def test_calibrate_never_recommends_a_tolerance_a_suite_would_refuse(workdir, capsys, monkeypatch):
    """Recommendations go through the suites' own tolerance model and bound; a refused one is not printed."""
    from harness.judge.tolerance import MAX_NATS, tolerance_problem

    assert tolerance_problem({"mean_abs_dlogp": 0.02, "max_abs_dlogp": 0.1, "tie_gap": 0.3, "max_margin_shift": 0.3}) is None
    assert "above 5 nats" in tolerance_problem({"mean_abs_dlogp": 0.02, "max_abs_dlogp": 0.1, "tie_gap": 1600.0,
                                                "max_margin_shift": 0.3})
    assert "greater than 0" in tolerance_problem({"mean_abs_dlogp": -1.0})
    assert MAX_NATS == 5.0 and calibrate.MAX_SAFETY == 100

    def result(args: Any) -> dict[str, Any]:
        rec = {"mean_abs_dlogp": 0.5, "max_abs_dlogp": 8.0, "tie_gap": 9.0, "max_margin_shift": 9.0,
               "observed": {"mean_abs_dlogp": 0.2, "max_abs_dlogp": 2.7, "tie_gap": 3.0, "max_margin_shift": 3.0}}
        good = {**rec, "mean_abs_dlogp": 0.02, "max_abs_dlogp": 0.07, "tie_gap": 0.22, "max_margin_shift": 0.22}
        variant = {"conditions": [], "regressions": [], "skipped": {}, "smallest_margins": {}, "fragile": []}
        return {"model": "m", "device": "CPU", "reference": {"attn_implementation": "sdpa", "threads": 2,
                                                             "cpu_capability": "AVX2"},
                "items": {"s::a": {"prompt_tokens": 3, "max_new_tokens": 4}}, "safety": 3.0, "floors": {},
                "variants": {"fp16": {**variant, "recommendation": good, "refused": None},
                             "nf4": {**variant, "recommendation": rec,
                                     "refused": tolerance_problem({k: v for k, v in rec.items() if k != "observed"})}}}

    monkeypatch.setattr(calibration, "run_calibration", result)
    (workdir / "suites").mkdir()
    rc, err = _run("harness-calibrate", ["--out", "calib"], capsys)
    assert rc == 1, err
    snippet = (workdir / "calib/tolerance.yaml").read_text()
    assert "fp16: {mean_abs_dlogp: 0.02" in snippet and "    # nf4: no tolerance recommended: max_abs_dlogp = 8" in snippet
    assert "nf4: {" not in snippet
    assert "**No tolerance recommended**" in (workdir / "calib/calibration.md").read_text()
    assert "no tolerance recommended for nf4" in err


def _tiny_model(folder: Path, tokenizer_from: Path, *, vocab: int) -> Path:
    """A two-layer Llama with random weights and the embedded model's tokenizer files."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    LlamaForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_from / name).is_file():
            shutil.copy(tokenizer_from / name, folder / name)
    return folder


def test_example_a_vocabulary_of_another_size_is_not_measured_and_json_stays_strict(
        tmp_path: Path, embedded_model_dir: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    old = _tiny_model(tmp_path / "old", embedded_model_dir, vocab=49152)
    new = _tiny_model(tmp_path / "new", embedded_model_dir, vocab=49160)
    suite = tmp_path / "s.yaml"
    suite.write_text("checks:\n  - {id: a, kind: greedy, prompt: 'The capital of France is', max_new_tokens: 2}\n")
    rc = diff_cli.main([str(old), str(new), "--suites", str(suite), "--device", "cpu", "--out", "out"])
    captured = capsys.readouterr()
    assert rc == 1, captured.err  # changed: config and weights differ
    text = (tmp_path / "out/diff.json").read_text()
    report = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert report["behaviour"]["mean_kl"] is None and report["behaviour"]["greedy_diverged"] is None
    assert report["behaviour"]["per_prompt"][0]["top1_agreement"] is None
    assert "diverges on 0 of" not in captured.out
    assert "behaviour: not measured on any of 1 prompts" in captured.out
    assert "vocabulary sizes differ (OLD 49152, NEW 49160)" in captured.out
    assert "| not measured | not measured | not measured | not measured |" in (tmp_path / "out/diff.md").read_text()
    assert diff_cli.main([str(old), str(old), "--suites", str(suite), "--device", "cpu", "--out", "same"]) == 0
