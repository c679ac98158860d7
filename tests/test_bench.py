"""``harness-bench``: one process measures the variants and writes the table, JSON and chart."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_bench_writes_table_json_and_chart(tmp_path: Path, embedded_model_dir: Path) -> None:
    out = tmp_path / "bench-out"
    cmd = [
        sys.executable, "-m", "harness.bench.run", "--registry", str(ROOT / "models.yaml"),
        "--variants", "fp16,nf4", "--device", "cpu", "--out", str(out),
        "--prompt-tokens", "8", "--new-tokens", "3", "--rounds", "1", "--warmup", "0",
        "--workload-tokens", "2", "--workload-batch", "1", "--drift-tokens", "3",
        "--prompt", "The capital of France is",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]

    md = (out / "report.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| variant"))
    for column in ("weights MiB", "peak MiB (process RSS)", "expected MiB (NF4)", "saving vs fp16",
                   "prefill tok/s", "decode tok/s", "mean KL vs fp16", "top-1 vs fp16"):
        assert column in header
    assert "not GPU memory" in md and "CPU speeds" in md
    assert "| fp16 |" in md and "| nf4 |" in md
    assert "## NF4 size: expected vs measured" in md

    report = json.loads((out / "report.json").read_text())
    assert report["device"]["class"] == "cpu"
    assert {"torch", "transformers", "bitsandbytes"} <= set(report["versions"])
    rows = {row["variant"]: row for row in report["variants"]}
    assert set(rows) == {"fp16", "nf4"}
    fp16, nf4 = rows["fp16"], rows["nf4"]
    assert nf4["memory"]["weights_bytes"] < fp16["memory"]["weights_bytes"]
    assert nf4["saving_vs_fp16"] > 2
    assert fp16["memory"]["peak"]["label"] == "process RSS"
    assert nf4["memory"]["expected_nf4_bytes"] > 0
    assert nf4["throughput"]["decode_tokens_per_s"] > 0
    drift = nf4["drift"]["fp16"]
    # every position of prompt + fp16's 3 greedy tokens compared, and NF4 moved the distributions
    from transformers import AutoTokenizer

    prompt_ids = AutoTokenizer.from_pretrained(embedded_model_dir)("The capital of France is")["input_ids"]
    assert drift["positions"] == len(prompt_ids) + 3
    assert drift["mean_kl"] > 1e-3
    assert report["load_counts"] == {"fp16": 1, "nf4": 1}

    assert (out / "memory.png").read_bytes()[:8] == PNG_MAGIC


def test_report_renders_an_unavailable_variant_and_a_gpu_label(tmp_path: Path) -> None:
    from harness.bench.report import render_markdown, write_outputs

    report = {
        "model": "m", "source": "s", "revision": None, "model_fingerprint": "f", "adapter": None,
        "adapter_fingerprint": None,
        "device": {"name": "cuda:0", "class": "cuda-sm90", "description": "H100 (cuda:0)", "is_cuda": True,
                   "torch_threads": 1},
        "versions": {"torch": "x"},
        "settings": {"memory_workload": {"prompts": ["a"], "batch_size": 1, "max_new_tokens": 1},
                     "throughput_shape": {"batch": 1, "prompt_tokens": 2, "new_tokens": 2},
                     "rounds": 1, "warmup_rounds": 0, "drift_prompts": ["a"], "drift_new_tokens": 1},
        "load_counts": {"fp16": 1},
        "variants": [
            {"variant": "fp16", "memory": {"weights_bytes": 2**21, "quant_state_bytes": 0,
                                           "expected_nf4_bytes": None,
                                           "peak": {"peak_bytes": 2**22, "label": "GPU peak allocated"}},
             "throughput": {"prefill_tokens_per_s": 10.0, "decode_tokens_per_s": 5.0},
             "drift": {}, "saving_vs_fp16": 1.0},
            {"variant": "nf4", "error": "NF4 is not available here", "status": "unavailable"},
            {"variant": "nf4-lora", "error": "NF4 cannot load: bitsandbytes is broken", "status": "failed"},
        ],
    }
    md = render_markdown(report)
    assert "peak MiB (GPU peak allocated)" in md
    assert "process RSS" not in md
    assert "| nf4 | unavailable: NF4 is not available here" in md
    assert "| nf4-lora | failed: NF4 cannot load" in md
    write_outputs(report, tmp_path)
    assert (tmp_path / "memory.png").read_bytes()[:8] == PNG_MAGIC


def test_a_variant_that_failed_to_load_fails_the_bench(tmp_path: Path, monkeypatch) -> None:
    """A platform without NF4 is reported; a broken load is reported *and* exits non-zero."""
    import harness.bench.run as bench

    def report(status: str) -> dict:
        return {"variants": [{"variant": "nf4", "error": "x", "status": status}]}

    monkeypatch.setattr(bench, "write_outputs", lambda report, out: None)
    monkeypatch.setattr(bench, "render_markdown", lambda report: "")
    monkeypatch.setattr(bench, "run_bench", lambda args: report("unavailable"))
    assert bench.main(["--out", str(tmp_path)]) == 0
    monkeypatch.setattr(bench, "run_bench", lambda args: report("failed"))
    assert bench.main(["--out", str(tmp_path)]) == 1
