"""Localization from a golden alone: greedy sidecars carry an activation fingerprint (issue 11, item 3).

The pytester runs count fingerprint computations through a conftest in the throwaway project,
so "a passing run computes none" is checked without timing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from harness.diff.fingerprints import (
    FINGERPRINT_VERSION, differences, fingerprint, fingerprint_noise, localize, sidecar_fingerprint,
    sidecar_localization,
)

LAYER = 14
SUITE = """
suite: gen
checks:
  - id: joke
    kind: greedy
    messages:
      - {role: user, content: "Create a funny joke about chickens."}
    max_new_tokens: 4
  - id: capital
    kind: greedy
    prompt: "The capital of France is"
    max_new_tokens: 4
"""
COUNTING = """
import harness.diff.fingerprints as fp

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
    project.run("--variants", "fp16", "--snapshot-update").assert_outcomes(passed=2)
    assert fingerprints_computed(project) == 2
    capital = sidecar(project, "smollm2-135m", "capital")
    recorded = json.loads(capital.read_text())["fingerprint"]
    assert recorded["version"] == FINGERPRINT_VERSION and recorded["positions"] == [0, 2, 4]
    assert len(capital.read_bytes()) < 6000  # the whole sidecar, provenance included

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
    import torch

    project = counted
    model_dir = tmp_path / "mymodel"
    shutil.copytree(embedded_model_dir, model_dir)
    project.run("--model", str(model_dir), "--variants", "fp16", "--snapshot-update").assert_outcomes(passed=2)
    strip_fingerprint(sidecar(project, "mymodel", "joke"))

    tensors = load_file(model_dir / "model.safetensors")
    name = f"model.layers.{LAYER}.mlp.down_proj.weight"
    weight = tensors[name].float()
    noise = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)) * weight.std() * 0.5
    tensors[name] = (weight + noise).to(tensors[name].dtype)
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})

    result = project.run("--model", str(model_dir), "--variants", "fp16")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines([
        "*localization (activation fingerprint vs the recording model): "
        f"behaviour first changes at layer {LAYER} (mlp) (fingerprint moved * x RMS, noise 0.02)",
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
    assert localize(_fp(**BASE), _fp(**BASE), 0.02) == "no change beyond noise at any layer"
    later = {**BASE, "layers.10": "1.0 0.3 0.3 0.3 | 1.0 0.9 0.3 0.3", "head": "5.0 3.0 1.0 1.0"}
    assert localize(_fp(**BASE), _fp(**later), 0.02).startswith("behaviour first changes at layer 10 (mlp)")
    both = {**later, "layers.2": "1.0 0.1 0.2 0.3 | 2.2 1.0 1.0 1.0"}  # layer 2's MLP output grew 10%
    assert localize(_fp(**BASE), _fp(**both), 0.02) == \
        "behaviour first changes at layer 2 (mlp) (fingerprint moved 0.1 x RMS, noise 0.02)"
    assert localize(_fp(**BASE), _fp(**both), 0.2).startswith("behaviour first changes at layer 10 (mlp)")
    assert localize(_fp(**BASE), _fp(**{**BASE, "embedding": "1.0 0.9 0.5 0.5"}), 0.02).startswith(
        "before layer 0: the tokenizer or embeddings")
    assert localize(_fp(**BASE), _fp(**{**BASE, "layers.2": "1.0 nan 0.2 0.3 | 2.0 1.0 1.0 1.0"}), 0.02).startswith(
        "behaviour first changes at layer 2 (attention)")
    assert localize(_fp(**BASE), _fp(**{**BASE, "head": "5.0 1.5 1.0 1.0"}), 0.02).startswith(
        "behaviour first changes after the last layer (head)")
    assert localize(_fp(**BASE), _fp(ids="y", **BASE), 0.02) == \
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
        lines[label] = sidecar_localization(path, unused, [1, 2, 3], noise=0.02)
    assert lines["missing"] == lines["no fingerprint"] == NO_FINGERPRINT
    assert lines["edited numbers"] == ("localization: the recorded fingerprint cannot be read (layers.2 holds "
                                       "something other than numbers: '1.0 0.1 x 0.3'); re-record to enable "
                                       "localization")
    assert "layers.2 has 1 groups of numbers, layer_parts names 2" in lines["a group lost"]
    assert "it has format 1, this harness reads 2" in lines["other format"]
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
    noise = fingerprint_noise("fp16")
    model.set_attn_implementation("eager")
    eager = fingerprint(model, ids)
    assert 0 < max(moved for _, moved in differences(golden, eager)) < noise
    assert localize(golden, eager, noise) == "no change beyond noise at any layer"
    assert localize(golden, fingerprint(model, ids[:-1]), noise).startswith("before layer 0: the tokenizer")
    # Re-recording under benign noise keeps the recorded numbers: sidecars do not churn.
    path = tmp_path / "capital.meta.json"
    path.write_text(dumps({"fingerprint": golden}))
    assert sidecar_fingerprint(path, model, ids, noise=noise) == {"fingerprint": golden}
    assert sidecar_fingerprint(path, model, ids[:-1], noise=noise)["fingerprint"]["tokens"] == len(ids) - 1
