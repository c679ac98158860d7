"""Localization from a golden alone: greedy sidecars carry an activation fingerprint.

The pytester runs count fingerprint computations through a conftest in the throwaway project,
so "a passing run computes none" is checked without timing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from conftest import add_noise, copy_model, gen_suite
from harness.judge.fingerprints import (
    FINGERPRINT_VERSION, differences, fingerprint, fingerprint_noise, localize, recorded_noise, sidecar_fingerprint,
    sidecar_localization, with_noise,
)

LAYER = 14
SUITE = gen_suite(joke=4, capital=4)
COUNTING = """
import harness.judge.fingerprints as fp

calls = []
original = fp.fingerprint


def counting(*args, **kwargs):
    calls.append(1)
    return original(*args, **kwargs)


fp.fingerprint = counting


def pytest_sessionfinish(session):
    with open("fingerprints.txt", "a") as fh:
        fh.write(f"{len(calls)}\\n")
"""
NO_FINGERPRINT = "localization: no fingerprint recorded; re-record to enable localization"


def fingerprints_computed(project: Any) -> int:
    """How many fingerprints the last run computed (the conftest appends one line per run)."""
    return int((project.path / "fingerprints.txt").read_text().split()[-1])


def sidecar(project: Any, model: str, check: str) -> Path:
    return project.golden / model / "cpu" / "fp16" / "gen" / f"{check}.meta.json"


def strip_fingerprint(path: Path) -> None:
    """The sidecar of a golden recorded before fingerprints (its golden_sha256 stays valid)."""
    meta = json.loads(path.read_text())
    del meta["fingerprint"]
    path.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


@pytest.fixture
def counted(project: Any) -> Any:
    project.suite("gen", SUITE)
    project.pytester.makeconftest(COUNTING)
    return project


def test_update_adds_fingerprints_to_old_sidecars_without_changing_goldens_and_passing_runs_compute_none(counted):
    project = counted
    project.record("--variants", "fp16", passed=2)
    assert fingerprints_computed(project) == 4  # each twice: its own kernel, then the other (noise)
    capital = sidecar(project, "smollm2-135m", "capital")
    recorded = json.loads(capital.read_text())["fingerprint"]
    assert recorded["version"] == FINGERPRINT_VERSION and recorded["positions"] == [0, 2, 4]
    assert len(capital.read_bytes()) < 8500  # the whole sidecar, provenance and noise record included
    noise = recorded_noise(recorded)  # per module: how far sdpa vs eager moved it at record time
    assert noise is not None and recorded["noise"]["method"].startswith("attention kernel sdpa vs eager")
    assert len(noise) == 1 + 30 * 4 + 2 and noise["embedding"] == 0  # no kernel runs before the first attention
    assert noise["layers.0.attention"] > 0 and max(noise.values()) < fingerprint_noise("fp16").constant

    project.run("--variants", "fp16").assert_outcomes(passed=2)
    assert fingerprints_computed(project) == 0  # passing runs pay nothing

    goldens = {p: p.read_bytes() for p in project.golden.rglob("*.json") if not p.name.endswith(".meta.json")}
    for check in ("capital", "joke"):
        strip_fingerprint(sidecar(project, "smollm2-135m", check))
    project.run("--variants", "fp16", "--snapshot-update").assert_outcomes(passed=2)
    assert {p: p.read_bytes() for p in goldens} == goldens
    assert json.loads(capital.read_text())["fingerprint"] == recorded  # same model: same numbers


def test_noise_on_one_layer_fails_with_that_layer_named_and_an_old_sidecar_gets_a_note(
        counted, embedded_model_dir: Path, tmp_path: Path):
    from safetensors.torch import load_file, save_file

    project = counted
    model_dir = tmp_path / "mymodel"
    shutil.copytree(embedded_model_dir, model_dir)
    project.run("--model", str(model_dir), "--variants", "fp16", "--snapshot-update").assert_outcomes(passed=2)
    strip_fingerprint(sidecar(project, "mymodel", "joke"))

    tensors = load_file(model_dir / "model.safetensors")
    add_noise(f"model.layers.{LAYER}.mlp.down_proj.weight", 0.5)(tensors)
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})

    result = project.run("--model", str(model_dir), "--variants", "fp16")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines([
        "*localization (activation fingerprint vs the recording model): "
        f"behaviour first changes at layer {LAYER} (mlp) (fingerprint moved * x RMS, threshold *: * x recorded noise *)",
    ])
    assert result.stdout.str().count(NO_FINGERPRINT) == 1
    assert "INTERNALERROR" not in result.stdout.str()
    assert fingerprints_computed(project) == 1  # the old sidecar has nothing to compare with


# -- without pytester ----------------------------------------------------------------------------

def _fp(parts: tuple[str, ...] = ("attention", "mlp"), ids: str = "x", **modules: str) -> dict[str, Any]:
    return {"version": FINGERPRINT_VERSION, "ids_sha256": ids, "layer_parts": list(parts), "modules": modules}


BASE = {"embedding": "1.0 0.5 0.5 0.5", "layers.2": "1.0 0.1 0.2 0.3 | 2.0 1.0 1.0 1.0",
        "layers.10": "1.0 0.3 0.3 0.3 | 1.0 0.3 0.3 0.3", "norm": "3.0 1 1 1", "head": "5.0 1.0 1.0 1.0"}


def test_localize_reads_layers_in_execution_order_not_key_order() -> None:
    fp16, nf4 = fingerprint_noise("fp16"), fingerprint_noise("nf4")  # no noise record: the constants 0.02, 0.15
    assert localize(_fp(**BASE), _fp(**BASE), fp16) == "no change beyond noise at any layer"
    later = {**BASE, "layers.10": "1.0 0.3 0.3 0.3 | 1.0 0.9 0.3 0.3", "head": "5.0 3.0 1.0 1.0"}
    assert localize(_fp(**BASE), _fp(**later), fp16).startswith("behaviour first changes at layer 10 (mlp)")
    both = {**later, "layers.2": "1.0 0.1 0.2 0.3 | 2.2 1.0 1.0 1.0"}  # layer 2's MLP output grew 10%
    assert localize(_fp(**BASE), _fp(**both), fp16) == \
        "behaviour first changes at layer 2 (mlp) (fingerprint moved 0.1 x RMS, threshold 0.02: the fp16 constant, " \
        "no noise recorded)"
    assert localize(_fp(**BASE), _fp(**both), nf4).startswith("behaviour first changes at layer 10 (mlp)")
    assert localize(_fp(**BASE), _fp(**{**BASE, "embedding": "1.0 0.9 0.5 0.5"}), fp16).startswith(
        "before layer 0: the tokenizer or embeddings")
    assert localize(_fp(**BASE), _fp(**{**BASE, "layers.2": "1.0 nan 0.2 0.3 | 2.0 1.0 1.0 1.0"}), fp16).startswith(
        "behaviour first changes at layer 2 (attention)")
    assert localize(_fp(**BASE), _fp(**{**BASE, "head": "5.0 1.5 1.0 1.0"}), fp16).startswith(
        "behaviour first changes after the last layer (head)")
    assert localize(_fp(**BASE), _fp(ids="y", **BASE), fp16) == \
        "before layer 0: the tokenizer (the prompt encodes to different token ids)"


def test_old_or_damaged_sidecars_give_one_line_never_an_error(tmp_path: Path) -> None:
    path = tmp_path / "capital.meta.json"
    unused: Any = None  # no model is needed to find out there is nothing to compare with
    cases = {
        "missing": None,
        "no fingerprint": {"model": "smollm2-135m", "golden_sha256": "0" * 64},
        "edited numbers": {"fingerprint": _fp(**{**BASE, "layers.2": "1.0 0.1 x 0.3 | 2.0 1.0 1.0 1.0"})},
        "a group lost": {"fingerprint": _fp(**{**BASE, "layers.2": "1.0 0.1 0.2 0.3"})},
        "other format": {"fingerprint": {**_fp(**BASE), "version": 1}},
        "not an object": {"fingerprint": [1, 2]},
        "not JSON": "{oops",
    }
    lines = {}
    for label, content in cases.items():
        path.unlink(missing_ok=True)
        if content is not None:
            path.write_text(content if isinstance(content, str) else json.dumps(content))
        lines[label] = sidecar_localization(path, unused, [1, 2, 3], rule=fingerprint_noise("fp16"))
    assert lines["missing"] == lines["no fingerprint"] == NO_FINGERPRINT
    assert lines["edited numbers"] == ("localization: the recorded fingerprint cannot be read (layers.2 holds "
                                       "something other than numbers: '1.0 0.1 x 0.3'); re-record to enable "
                                       "localization")
    assert "layers.2 has 1 groups of numbers, layer_parts names 2" in lines["a group lost"]
    assert "it has format 1, this harness reads 2 and 3" in lines["other format"]
    assert "it is a JSON list, not an object" in lines["not an object"]
    assert "the sidecar capital.meta.json does not parse" in lines["not JSON"]
    assert all("\n" not in line and line.endswith("re-record to enable localization") for line in lines.values())


def test_fingerprint_is_small_ignores_kernel_noise_and_is_kept_on_rerecord(embedded_model_dir: Path,
                                                                          tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from harness.golden import dumps

    ids = AutoTokenizer.from_pretrained(str(embedded_model_dir))("The capital of France is Paris.")["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(str(embedded_model_dir), dtype=torch.float16).eval()
    golden = fingerprint(model, ids)
    assert json.loads(dumps(golden)) == golden and len(dumps(golden)) < 4500
    assert len(golden["modules"]) == 1 + 30 + 2 and golden["layer_parts"] == ["input_norm", "attention",
                                                                             "post_norm", "mlp"]
    rule = fingerprint_noise("fp16", dtype="float16")
    model.set_attn_implementation("eager")
    eager = fingerprint(model, ids)
    model.set_attn_implementation("sdpa")
    assert 0 < max(moved for _, moved in differences(golden, eager)) < rule.constant
    assert localize(golden, eager, rule) == "no change beyond noise at any layer"
    assert localize(golden, fingerprint(model, ids[:-1]), rule).startswith("before layer 0: the tokenizer")
    # Re-recording under benign noise keeps the recorded numbers (noise record included): no churn.
    path = tmp_path / "capital.meta.json"
    recorded = with_noise(golden, model, ids)
    assert model.config._attn_implementation == "sdpa"  # the kernel switch is undone
    path.write_text(dumps({"fingerprint": recorded}))
    model.set_attn_implementation("eager")
    assert sidecar_fingerprint(path, model, ids, rule=rule) == {"fingerprint": recorded}
    model.set_attn_implementation("sdpa")
    assert sidecar_fingerprint(path, model, ids[:-1], rule=rule)["fingerprint"]["tokens"] == len(ids) - 1


QUIET = {"embedding": "0", "layers.2": "0.0005 | 0.0005", "layers.10": "0.002 | 0.05", "norm": "0.01", "head": "0.01"}


def _recorded(noise: dict[str, str] | None = QUIET, version: int = FINGERPRINT_VERSION, **modules: str) -> dict[str, Any]:
    fp = {**_fp(**(modules or BASE)), "version": version}
    return fp if noise is None else {**fp, "noise": {"method": "attention kernel sdpa vs eager", "modules": noise}}


def test_each_module_is_judged_against_its_own_recorded_noise_and_without_one_against_the_constant() -> None:
    rule = fingerprint_noise("fp16", dtype="float16")
    noisy_mlp = {**BASE, "layers.10": "1.0 0.3 0.3 0.3 | 1.0 0.4 0.3 0.3"}  # moved 0.1: 5x the fp16 constant
    assert localize(_recorded(None), _fp(**noisy_mlp), rule).startswith("behaviour first changes at layer 10 (mlp)")
    assert localize(_recorded(), _fp(**noisy_mlp), rule) == "no change beyond noise at any layer"  # its noise: 0.05
    quiet_attention = {**BASE, "layers.2": "1.0 0.11 0.2 0.3 | 2.0 1.0 1.0 1.0"}  # moved 0.01: half the constant
    assert localize(_recorded(None), _fp(**quiet_attention), rule) == "no change beyond noise at any layer"
    assert localize(_recorded(), _fp(**quiet_attention), rule) == (
        f"behaviour first changes at layer 2 (attention) (fingerprint moved 0.01 x RMS, threshold {rule.floor:.3g}: "
        "the float16 floor, recorded noise 0.0005)")
    cross = fingerprint_noise("fp16", dtype="float16", cross_device=True)
    assert localize(_recorded(), _fp(**quiet_attention), cross) == "no change beyond noise at any layer"
    louder = {**BASE, "layers.10": "1.0 0.3 0.3 0.3 | 1.0 0.3 0.3 0.3", "head": "5.0 1.2 1.0 1.0"}  # head moved 0.2
    assert localize(_recorded(), _fp(**louder), rule) == (
        f"behaviour first changes after the last layer (head) (fingerprint moved 0.2 x RMS, threshold "
        f"{rule.factor * 0.01:.3g}: {rule.factor:g} x recorded noise 0.01)")


def test_format_2_fingerprints_without_a_noise_record_still_localize_with_the_constants(tmp_path: Path) -> None:
    old = _recorded(None, version=2)
    both = {**BASE, "layers.2": "1.0 0.1 0.2 0.3 | 2.2 1.0 1.0 1.0", "layers.10": "1.0 0.3 0.3 0.3 | 1.0 0.9 0.3 0.3"}
    assert localize(old, _fp(**both), fingerprint_noise("fp16", dtype="float16")) == (
        "behaviour first changes at layer 2 (mlp) (fingerprint moved 0.1 x RMS, threshold 0.02: the fp16 constant, "
        "no noise recorded)")
    assert localize(old, _fp(**both), fingerprint_noise("nf4", dtype="bfloat16")).startswith(
        "behaviour first changes at layer 10 (mlp) (fingerprint moved 0.6 x RMS, threshold 0.15: the nf4 constant")
    path = tmp_path / "capital.meta.json"
    unused: Any = None
    damaged = _recorded({**QUIET, "layers.2": "0.0005"})
    path.write_text(json.dumps({"fingerprint": damaged}))
    assert sidecar_localization(path, unused, [1], rule=fingerprint_noise("fp16")) == (
        "localization: the recorded fingerprint cannot be read (its noise record: layers.2 has 1 groups of numbers, "
        "layer_parts names 2); re-record to enable localization")


def test_nf4_weight_noise_the_constant_missed_is_localized_against_the_recorded_noise(
        embedded_model_dir: Path, tmp_path: Path) -> None:
    """5% Gaussian noise on layer 14's down_proj: the nf4 constant (0.15) sees nothing, the record does."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from harness.golden import dumps
    from harness.models.pool import nf4_config

    def nf4(folder: Path) -> Any:
        return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float16, device_map="cpu",
                                                    quantization_config=nf4_config()).eval()

    ids = AutoTokenizer.from_pretrained(str(embedded_model_dir))("The capital of France is")["input_ids"]
    rule = fingerprint_noise("nf4", dtype="bfloat16")
    path = tmp_path / "capital-raw.meta.json"
    path.write_text(dumps(sidecar_fingerprint(path, nf4(embedded_model_dir), ids, rule=rule)))
    recorded = json.loads(path.read_text())["fingerprint"]
    old_format = tmp_path / "old.meta.json"
    old_format.write_text(dumps({"fingerprint": {**{k: v for k, v in recorded.items() if k != "noise"}, "version": 2}}))

    noise = add_noise(f"model.layers.{LAYER}.mlp.down_proj.weight", 0.05)
    changed = copy_model(embedded_model_dir, tmp_path / "changed", noise)
    model = nf4(changed)

    assert sidecar_localization(path, model, ids, rule=rule).startswith(
        "localization (activation fingerprint vs the recording model): behaviour first changes at layer 14 (mlp)")
    assert sidecar_localization(old_format, model, ids, rule=rule).endswith("no change beyond noise at any layer")


def test_a_model_that_cannot_switch_kernels_records_why_and_is_judged_with_the_constant() -> None:
    class OneKernel:
        config = type("Config", (), {"_attn_implementation": "sdpa"})()

        def set_attn_implementation(self, name: str) -> None:
            raise ValueError(f"{name} is not supported by this architecture")

    fp = with_noise(_fp(**BASE), OneKernel(), [1, 2, 3])
    assert fp["noise"] == {"method": "none, judged with the constant: OneKernel cannot switch its attention kernel "
                                     "(ValueError: eager is not supported by this architecture)"}
    assert recorded_noise(fp) is None
    both = {**BASE, "layers.2": "1.0 0.1 0.2 0.3 | 2.2 1.0 1.0 1.0"}
    assert localize(fp, _fp(**both), fingerprint_noise("fp16")).endswith("the fp16 constant, no noise recorded)")
