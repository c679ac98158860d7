"""harness-diff on the real embedded model with constructed updates (fingerprints: test_fingerprint_goldens.py).

Each update is a modified copy of the converted model folder (or of the pirate adapter)
under a temporary folder; one prompt and two new tokens keep the CPU cost low.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import add_noise, copy_model
from harness.diff.cli import main

REPO = Path(__file__).resolve().parents[1]
ADAPTER = REPO / "fixtures" / "adapters" / "smollm2-135m-pirate"
LAYER, TENSOR = 14, "model.layers.14.mlp.down_proj.weight"
SUITE = """
suite: mini
checks:
  - id: capital
    kind: greedy
    prompt: "The capital of France is"
    max_new_tokens: 2
"""


@pytest.fixture(scope="module")
def layer_noise_model(embedded_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded model with 5% Gaussian noise on layer 14's MLP down-projection."""
    return copy_model(embedded_model_dir, tmp_path_factory.mktemp("upd") / "layer14", add_noise(TENSOR, 0.05))


def run_diff(tmp_path: Path, old: str | Path, new: str | Path, *extra: str, suite: bool = True) -> tuple[int, dict[str, Any], Path]:
    suites = tmp_path / "mini.yaml"
    suites.write_text(SUITE)
    out = tmp_path / "report"
    argv = [str(old), str(new), "--registry", str(REPO / "models.yaml"), "--device", "cpu", "--out", str(out),
            "--new-tokens", "2", "--suites", *([str(suites)] if suite else []), *extra]
    rc = main(argv)
    return rc, json.loads((out / "diff.json").read_text()), out


def test_noise_on_one_layer_is_localized_to_that_layer(tmp_path: Path, layer_noise_model: Path) -> None:
    rc, report, out = run_diff(tmp_path, "smollm2-135m", layer_noise_model)
    assert rc == 1
    assert report["files"] == []
    weights = report["weights"]
    assert [t["name"] for t in weights["most_changed"]] == [TENSOR]
    assert weights["most_changed"][0]["relative_diff"] == pytest.approx(0.05, rel=0.05)
    first = report["localization"]["first_change"]
    assert first["module"] == f"layers.{LAYER}.mlp"
    assert report["localization"]["verdict"] == f"behaviour first changes at layer {LAYER} (mlp)"
    # Nothing upstream of the change moves at all; the noise floor was measured, not assumed.
    upstream = [m for m in report["localization"]["modules"] if m["module"] != first["module"]][:4 * LAYER]
    assert all(m["relative_diff"] == 0 and not m["changed"] for m in upstream)
    assert "sdpa vs eager" in report["localization"]["noise"]["method"]
    md = (out / "diff.md").read_text()
    assert f"**behaviour first changes at layer {LAYER} (mlp)**" in md
    assert f"| `{TENSOR}` | {LAYER} | 0.05 |" in md
    assert (out / "diff.png").stat().st_size > 1000


def test_tokenizer_edit_is_a_tokenizer_change_before_any_layer(tmp_path: Path, editable_model: Any) -> None:
    new = editable_model("tok-edit")
    data = json.loads((new / "tokenizer.json").read_text())
    data["model"]["merges"] = [m for m in data["model"]["merges"] if m != ["Ġcap", "ital"]]
    (new / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    rc, report, out = run_diff(tmp_path, "smollm2-135m", new)
    assert rc == 1
    [change] = report["files"]
    assert (change["file"], change["role"]) == ("tokenizer.json", "tokenizer")
    assert "merges: 48900 -> 48899; 0 added, 1 removed" in change["summary"]
    assert "- merge 'Ġcap ital'" in change["diff"]
    assert report["weights"]["changed_count"] == 0
    assert report["localization"]["tokenizer_changed_prompts"] == ["mini/capital"]
    assert report["localization"]["verdict"].startswith("before layer 0: the tokenizer")
    assert report["localization"]["first_change"] is None  # same ids in, same activations out


def test_generation_config_edit_is_named(tmp_path: Path, editable_model: Any) -> None:
    new = editable_model("gen-edit")
    config = json.loads((new / "generation_config.json").read_text())
    config.update(temperature=0.7, do_sample=True)
    (new / "generation_config.json").write_text(json.dumps(config, indent=2))
    rc, report, out = run_diff(tmp_path, "smollm2-135m", new, suite=False)
    assert rc == 1
    [change] = report["files"]
    assert (change["file"], change["role"], change["status"]) == ("generation_config.json", "generation_config", "changed")
    assert sorted(change["summary"]) == ["do_sample: added (true)", "temperature: added (0.7)"]
    assert report["weights"]["changed_count"] == 0
    assert "- files: generation_config.json (generation_config, changed)" in (out / "diff.md").read_text()


def test_adapter_rescale_is_localized_to_its_target_modules(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    new = tmp_path / "pirate-rescaled"
    shutil.copytree(ADAPTER, new)
    tensors = load_file(str(new / "adapter_model.safetensors"))
    save_file({k: v * 1.5 if ".lora_B." in k else v for k, v in tensors.items()},
              str(new / "adapter_model.safetensors"))
    rc, report, _ = run_diff(tmp_path, ADAPTER, new, "--base", "smollm2-135m")
    assert rc == 1
    targets = set(json.loads((ADAPTER / "adapter_config.json").read_text())["target_modules"])
    changed = report["weights"]["most_changed"]
    assert changed and report["weights"]["changed_count"] == 4 * 30
    assert {name.split(".")[-2] for name in (c["name"] for c in changed)} <= targets
    assert all(c["relative_diff"] > 0 for c in changed)
    assert report["localization"]["first_change"]["module"] == "layers.0.attention"
    assert report["localization"]["verdict"] == "behaviour first changes at layer 0 (attention)"
    assert [c["file"] for c in report["files"]] == ["adapter/adapter_model.safetensors"] or report["files"] == []


def test_unchanged_resave_reports_no_change(tmp_path: Path, embedded_model_dir: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    new = copy_model(embedded_model_dir, tmp_path / "resaved", metadata={"format": "pt", "saved": "again"})
    config = json.loads((new / "config.json").read_text())
    (new / "config.json").write_text(json.dumps(dict(reversed(list(config.items()))), indent=4))
    assert (new / "model.safetensors").read_bytes() != (embedded_model_dir / "model.safetensors").read_bytes()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # the chart is optional
    rc, report, out = run_diff(tmp_path, embedded_model_dir, new)
    assert rc == 0
    assert report["unchanged"] is True
    assert report["summary"] == ["no change: files, weights and activations on the suites' prompts are the same"]
    assert report["behaviour"]["mean_kl"] == 0 and report["behaviour"]["greedy_diverged"] == 0
    assert not (out / "diff.png").exists()
    assert "![" not in (out / "diff.md").read_text()


def test_unusable_arguments_exit_2_with_one_actionable_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    registry = ["--registry", str(REPO / "models.yaml"), "--out", str(tmp_path / "out")]
    assert main(["smollm2-135m", "smollm2-135m", "--suites", str(tmp_path / "missing"), *registry]) == 2
    assert "--suites" in capsys.readouterr().err
    assert main(["smollm2-135m", str(tmp_path / "nowhere"), "--suites", *registry]) == 2
    err = capsys.readouterr().err
    assert "NEW: " in err and "Fix:" in err and "--model" not in err
    assert not (tmp_path / "out").exists()


def test_a_difference_below_noise_is_named_but_not_called_a_change() -> None:
    from harness.judge.localize import ModuleDiff
    from harness.diff.run import ModelDiff, PromptResult
    from harness.diff.weights import WeightsDiff

    prompt = PromptResult("s/p", True, 5, 2, 0.0, 0.0, 1.0, None, None)
    rows = [ModuleDiff("embedding", 0.0, 0.0, 2e-3), ModuleDiff("layers.3.mlp", 1e-4, 0.0, 2e-3),
            ModuleDiff("layers.9.attention", 1e-3, 1e-3, 5e-3)]
    diff = ModelDiff(None, None, [], WeightsDiff(), prompts=[prompt], modules=rows)  # type: ignore[arg-type]
    assert diff.first_change is None
    assert diff.localization == ("no change beyond noise at any layer; "
                                 "the first (sub-noise) difference is at layer 3 (mlp)")
    rows.append(ModuleDiff("layers.12.mlp", 0.1, 1e-3, 5e-3))
    assert diff.localization == "behaviour first changes at layer 12 (mlp)"
    assert not diff.unchanged


def test_added_token_rows_are_a_reshape_and_a_head_change(tmp_path: Path, embedded_model_dir: Path) -> None:
    import torch

    def grow(tensors: dict[str, Any]) -> None:
        emb = tensors["model.embed_tokens.weight"]
        tensors["model.embed_tokens.weight"] = torch.cat([emb, emb[:2].clone()])

    new = copy_model(embedded_model_dir, tmp_path / "grown", grow)
    config = json.loads((new / "config.json").read_text())
    config["vocab_size"] += 2
    (new / "config.json").write_text(json.dumps(config, indent=2))
    rc, report, out = run_diff(tmp_path, embedded_model_dir, new)
    assert rc == 1
    assert [c["summary"] for c in report["files"]] == [["vocab_size: 49152 -> 49154"]]
    assert report["weights"]["reshaped"] == [{"name": "model.embed_tokens.weight", "old": [49152, 576],
                                             "new": [49154, 576]}]
    assert report["localization"]["first_change"]["module"] == "head"
    assert report["localization"]["verdict"] == "behaviour first changes after the last layer (head)"
    assert any("vocabulary sizes differ (OLD 49152, NEW 49154)" in n for n in report["notes"])
    assert "| not measured |" in (out / "diff.md").read_text() and "| nan |" not in (out / "diff.md").read_text()
    assert report["behaviour"]["mean_kl"] is None  # not measured: strict JSON null, never NaN


def test_reference_stand_ins_judge_new_against_the_live_record_of_old(tmp_path: Path) -> None:
    from harness.run.reference import LiveReference, Recorder
    from harness.errors import CheckFailure

    golden = tmp_path / "golden" / "m" / "cpu" / "fp16" / "gen" / "capital.json"
    recorder = Recorder()
    recorder.assert_matches(golden, {"ids": (1, 2, 3)}, explain=lambda e, a: "unused")
    assert recorder.records == {golden: {"ids": [1, 2, 3]}} and not golden.parent.exists()
    live = LiveReference(records=recorder.records, label="new-model vs smollm2-135m")
    live.assert_matches(golden, {"ids": [1, 2, 3]}, explain=lambda e, a: "unused")
    live.assert_matches(golden, {"ids": [1, 2, 4]}, explain=lambda e, a: "unused", judge=lambda e, a: True)
    with pytest.raises(CheckFailure, match=r"^new-model vs smollm2-135m: ids differ: \[1, 2, 3\] -> \[1, 2, 4\]"):
        live.assert_matches(golden, {"ids": [1, 2, 4]}, explain=lambda e, a: f"ids differ: {e['ids']} -> {a['ids']}")
    with pytest.raises(CheckFailure, match="recorded nothing for this check, so it was not judged"):
        live.assert_matches(golden.with_name("other.json"), {"ids": []}, explain=lambda e, a: "")
