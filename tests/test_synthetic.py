"""Config-only models (``harness-bench --config``): random weights of a real architecture's shapes,
loaded through the pool in every variant; the KV cache, the bandwidth roofline and the 4-bit flags."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Parameter counts of the published checkpoints (tied embeddings once): the shipped configs
# must reproduce them exactly, or the memory they measure is another model's.
PUBLISHED = {
    "smollm2-135m": 134_515_008,
    "qwen2-0.5b": 494_032_768,
    "phi-3-mini": 3_821_079_552,
    "qwen2-7b": 7_615_616_512,
    "llama-3-8b": 8_030_261_248,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_shipped_configs_have_the_published_parameter_counts(name: str) -> None:
    from harness.models.synthetic import load_config, parameter_count

    assert parameter_count(load_config(name)[1]) == PUBLISHED[name]


def test_a_mistyped_config_name_is_one_clear_error() -> None:
    from harness.errors import ModelNotFoundError
    from harness.models.synthetic import load_config

    with pytest.raises(ModelNotFoundError, match=r"did you mean 'llama-3-8b'\?.*Shipped: .*tiny-llama"):
        load_config("llama-3-8")


def test_a_config_that_asks_for_hub_code_is_refused(tmp_path: Path) -> None:
    from harness.errors import ModelLoadError
    from harness.models.synthetic import load_config

    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "phi3", "auto_map": {"AutoConfig": "x.Y"}}))
    with pytest.raises(ModelLoadError, match="auto_map.*trust_remote_code"):
        load_config(str(config))
    config.write_text("[1, 2]")
    with pytest.raises(ModelLoadError, match="model_type"):
        load_config(str(tmp_path))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    from harness.models.synthetic import materialize

    return materialize("tiny-llama", out_dir=tmp_path_factory.mktemp("synthetic"))


def test_a_materialized_model_loads_in_every_variant_through_the_pool(tiny) -> None:
    from harness.models.devices import Device
    from harness.models.pool import ModelPool
    from harness.models.registry import ModelEntry
    from harness.models.sources import ResolvedModel
    from harness.models.variants import VariantSpec

    assert tiny.parameters == 115_008 and tiny.adapter is not None
    assert json.loads((tiny.folder / "harness-source.json").read_text())["synthetic"] == "tiny-llama"
    resolved = ResolvedModel("tiny", tiny.folder, ModelEntry(path=str(tiny.folder)), "test", tiny.adapter)
    pool = ModelPool(resolved=resolved, device=Device("cpu", "cpu", "CPU"))
    ids = pool.tokenizer("any text, é and 中", add_special_tokens=False)["input_ids"]
    assert ids and max(ids) < 256  # one token per byte, below any vocab_size
    weights = {}
    for key in ("fp16", "fp16-lora", "nf4", "nf4-lora"):
        loaded = pool.get(VariantSpec.from_key(key))  # the pool refuses adapters that did not load
        weights[key] = loaded.weights_bytes
        lora = [n for n, _ in loaded.model.named_parameters() if "lora_B" in n]
        assert bool(lora) == key.endswith("-lora")
    assert weights["nf4"] < weights["fp16"] < weights["fp16-lora"]
    pool.release()


def test_the_kv_cache_is_the_models_own_and_matches_the_config_formula(tiny) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from harness.measure.roofline import kv_cache_bytes, measured_kv_cache_bytes

    model = AutoModelForCausalLM.from_pretrained(tiny.folder, dtype=torch.float16)
    ids = torch.randint(0, 256, (3, 11))
    expected = kv_cache_bytes(model.config, batch=3, tokens=11)
    # 2 (k, v) x 2 layers x 2 kv heads x 16 head_dim x 11 tokens x 3 rows x 2 bytes
    assert expected == 2 * 2 * 2 * 16 * 11 * 3 * 2
    assert measured_kv_cache_bytes(model, ids) == expected


@pytest.mark.parametrize(("name", "tb_s"), [
    ("NVIDIA H100 80GB HBM3", 3.35), ("NVIDIA H100 PCIe", 2.0), ("NVIDIA H100 NVL", 3.9), ("NVIDIA H200", 4.8),
    ("NVIDIA A100-SXM4-80GB", 2.039), ("NVIDIA A100 80GB PCIe", 1.935), ("NVIDIA A100-SXM4-40GB", 1.555),
    ("NVIDIA L4", 0.3), ("NVIDIA L40S", 0.864), ("Tesla T4", 0.32),
])
def test_peak_bandwidth_of_known_cards(name: str, tb_s: float) -> None:
    from harness.measure.roofline import peak_bandwidth

    found = peak_bandwidth(name)
    assert found is not None and found.bytes_per_s == pytest.approx(tb_s * 1e12)
    assert name in found.source


def test_unknown_cards_have_no_roofline_unless_given_one() -> None:
    from harness.measure.roofline import decode_roofline_fraction, peak_bandwidth

    assert peak_bandwidth("Some Future GPU") is None and peak_bandwidth(None) is None
    given = peak_bandwidth("Some Future GPU", override_gb_s=1000)
    assert given is not None and given.bytes_per_s == 1e12 and "--bandwidth" in given.source
    with pytest.raises(ValueError, match="positive"):
        peak_bandwidth(None, override_gb_s=0)
    # batch 4 at 400 tok/s = 100 steps/s, each reading 2 GB of weights and 0.5 GB of cache: 250 GB/s of 1 TB/s
    fraction = decode_roofline_fraction(weight_bytes=2 * 10**9, kv_bytes_mid=5 * 10**8, decode_tokens_per_s=400,
                                        batch=4, bandwidth=given)
    assert fraction == pytest.approx(0.25)
    assert decode_roofline_fraction(weight_bytes=1, kv_bytes_mid=0, decode_tokens_per_s=1, batch=1,
                                    bandwidth=None) is None


def _row(variant: str, peak: int, decode: float, shape: dict | None = None) -> dict:
    shape = shape or {"batch": 1, "prompt_tokens": 8, "new_tokens": 4}
    return {"variant": variant, "sweep": [{"shape": shape, "peak": {"peak_bytes": peak},
                                           "throughput": {"decode_tokens_per_s": decode}}]}


def test_flags_name_the_shapes_where_4bit_peaks_higher_or_decodes_slower() -> None:
    from harness.bench.doc import flags

    rows = [_row("fp16", 100, 50.0), _row("nf4", 120, 40.0), _row("fp16-lora", 100, 50.0), _row("nf4-lora", 90, 60.0)]
    found = flags(rows, peak_label="GPU peak allocated")
    assert [(f["issue"], f["variant"], f["reference"]) for f in found] == [
        ("bitsandbytes#1141", "nf4", "fp16"), ("bitsandbytes#611", "nf4", "fp16")]
    assert "1 x 8 -> 4" in found[0]["text"] and "GPU peak allocated" in found[0]["text"]
    # a shape only one side measured (out of memory) is not compared
    rows[1]["sweep"][0] = {"shape": rows[1]["sweep"][0]["shape"], "error": "out of memory"}
    assert flags(rows, peak_label="x") == []


def test_sweep_parsing() -> None:
    from harness.bench.run import parse_sweep

    shapes = parse_sweep("1x128, 8X512", new_tokens=16)
    assert [(s.batch, s.prompt_tokens, s.new_tokens) for s in shapes] == [(1, 128, 16), (8, 512, 16)]
    assert parse_sweep(None, new_tokens=4) == []
    for bad in ("8", "0x5", "ax2", ","):
        with pytest.raises(ValueError, match="--sweep"):
            parse_sweep(bad, new_tokens=4)


def test_bench_measures_a_config_only_model_in_every_variant(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "harness.bench.run", "--config", "tiny-llama", "--device", "cpu", "--out", str(out),
           "--sweep", "1x8,2x16", "--new-tokens", "3", "--rounds", "1", "--warmup", "0", "--bandwidth", "50",
           "--workload-tokens", "2", "--workload-batch", "1", "--prompt", "Hello", "--work-dir", str(tmp_path / "w")]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["synthetic"]["name"] == "tiny-llama" and report["synthetic"]["parameters"] == 115_008
    assert report["bandwidth"]["source"] == "--bandwidth 50 GB/s"
    rows = {r["variant"]: r for r in report["variants"]}
    assert set(rows) == {"fp16", "fp16-lora", "nf4", "nf4-lora"}
    for row in rows.values():
        assert [s["shape"]["batch"] for s in row["sweep"]] == [1, 2]
        # 2 x 2 layers x 2 kv heads x 16 head_dim x (16 + 3) tokens x 2 rows x 2 bytes
        assert row["sweep"][1]["kv_cache_bytes"] == 2 * 2 * 2 * 16 * 19 * 2 * 2
        assert row["sweep"][1]["roofline_fraction"] > 0
        assert row["throughput"]["decode_tokens_per_s"] == row["sweep"][0]["throughput"]["decode_tokens_per_s"]
        assert "skipped" in row["drift"]  # random weights: no drift
    assert rows["nf4"]["memory"]["weights_bytes"] < rows["fp16"]["memory"]["weights_bytes"]
    assert isinstance(report["flags"], list)
    md = (out / "report.md").read_text()
    assert "Config-only: the tiny-llama architecture" in md and "## Shapes: peaks, KV cache and speed" in md
    assert "| nf4-lora | 2 x 16 -> 3 |" in md and "## Flags" in md
    assert not list((tmp_path / "w").glob("*-random*"))  # the random model is removed afterwards


def test_config_and_model_together_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from harness.bench.run import main

    assert main(["--config", "tiny-llama", "--model", "smollm2-135m", "--out", str(tmp_path)]) == 2
    assert "--config and --model both given" in capsys.readouterr().err
    assert main(["--config", "no-such-arch", "--out", str(tmp_path), "--device", "cpu"]) == 2
    assert "neither a shipped architecture" in capsys.readouterr().err
