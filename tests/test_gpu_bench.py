"""scripts/gpu-bench.sh: the GPU run, prepared. Its dry run takes every step on CPU, so the script
cannot fail on a typo when a GPU machine is lent for a few minutes."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _script():
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "scripts" / "gpu_bench.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_bench", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _wheel(folder: Path, name: str, files: dict[str, bytes]) -> None:
    with zipfile.ZipFile(folder / name, "w") as zf:
        for member, data in files.items():
            zf.writestr(member, data)


def test_the_packages_travel_as_one_tree_without_other_platforms_bitsandbytes(tmp_path: Path) -> None:
    gpu_bench = _script()
    wheels = tmp_path / "whl"
    wheels.mkdir()
    libs = {f"bitsandbytes/libbitsandbytes_{v}.so": b"x" * 10 for v in ("cpu", "cuda118", "cuda128", "cuda130",
                                                                      "cuda132", "rocm64", "xpu2025")}
    _wheel(wheels, "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl",
           {"bitsandbytes/__init__.py": b"", **libs, "bitsandbytes-0.50.2.dist-info/METADATA": b"Name: bitsandbytes"})
    for dist in [d for d in gpu_bench.NEEDED.values() if d != "bitsandbytes"]:
        _wheel(wheels, f"{dist}-1.0-py3-none-any.whl", {f"{dist}/__init__.py": b""})
    site = gpu_bench.build_site(wheels, tmp_path / "carry" / "site.tar.gz")
    with tarfile.open(tmp_path / "carry" / "site.tar.gz") as tar:
        names = set(tar.getnames())
    kept = {n for n in names if "libbitsandbytes" in n}
    assert kept == {f"bitsandbytes/libbitsandbytes_{v}.so" for v in ("cpu", "cuda130", "cuda132")}
    assert "bitsandbytes-0.50.2.dist-info/METADATA" in names and "syrupy/__init__.py" in names
    assert sorted(site["pruned_bitsandbytes_libraries"]) == sorted(
        f"libbitsandbytes_{v}.so" for v in ("cuda118", "cuda128", "rocm64", "xpu2025"))
    (wheels / "gguf-1.0-py3-none-any.whl").unlink()
    with pytest.raises(gpu_bench.StepFailed, match="no wheel for gguf"):
        gpu_bench.build_site(wheels, tmp_path / "x.tar.gz")
    _wheel(wheels, "gguf-1.0-py3-none-any.whl", {})
    _wheel(wheels, "gguf-2.0-py3-none-any.whl", {})
    with pytest.raises(gpu_bench.StepFailed, match="two versions of gguf"):
        gpu_bench.build_site(wheels, tmp_path / "x.tar.gz")


def test_a_file_is_split_into_verified_parts_that_fit(tmp_path: Path) -> None:
    gpu_bench = _script()
    data = os.urandom(10_000)
    (tmp_path / "w.whl").write_bytes(data)
    parts = gpu_bench.split_file(tmp_path / "w.whl", tmp_path, part_bytes=4096, stem="embedded")
    assert [p["bytes"] for p in parts] == [4096, 4096, 1808]
    assert b"".join((tmp_path / p["file"]).read_bytes() for p in parts) == data
    assert all(hashlib.sha256((tmp_path / p["file"]).read_bytes()).hexdigest() == p["sha256"] for p in parts)
    with pytest.raises(gpu_bench.StepFailed, match="no room left"):
        gpu_bench.split_file(tmp_path / "w.whl", tmp_path, part_bytes=0, stem="x")


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_dry_run_takes_every_step_on_cpu(tmp_path: Path, embedded_model_dir: Path) -> None:
    """pack -> install -> synthetic (tiny config, four variants) -> receive -> real (one prompt, fp16-lora) -> doc,
    in temporary folders: the goldens and .gpu-carry/ of the repository are not touched."""
    golden_before = _digest(ROOT / "golden")
    carry_before = _digest(ROOT / ".gpu-carry") if (ROOT / ".gpu-carry").is_dir() else None
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-bench.sh"), "all", "--dry-run", "--out", str(out),
                           "--work", str(work)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
                          check=False)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    for step in ("pack", "install", "synthetic", "receive", "real"):
        assert f"gpu-bench: == {step} (dry run)" in log and f"gpu-bench: == {step} done" in log
    manifest = json.loads((work / "carry" / "manifest.json").read_text())
    assert all(call["bytes"] <= 64 * 2**20 for call in manifest["calls"]) and len(manifest["parts"]) >= 2
    assert "reassembled, sha256 matches the pin" in log
    assert "model.safetensors: identical to the file the CPU goldens were recorded with" in log
    assert "MEASURED CROSS-DEVICE FACTOR: cpu goldens of smollm2-135m judged on cpu" in log
    # the dry run's variant (fp16-lora: the adapter path), in both directions
    assert log.count("  fp16-lora: cross-device / same-device noise: mean |Δ log p| x") >= 2

    names = sorted(p.name for p in out.iterdir())
    assert names == ["benchmark-gpu.json", "benchmark-gpu.md", "benchmark-gpu.png", "calibration.tar.gz",
                     "golden-cpu.tar.gz", "gpu-bench.log", "synthetic.tar.gz"]
    assert len(names) <= 8 and all((out / n).stat().st_size < 16 * 2**20 for n in names)  # what $OUT returns
    with tarfile.open(out / "golden-cpu.tar.gz") as tar:
        recorded = [n for n in tar.getnames() if not n.endswith(".meta.json")]
    assert recorded == ["smollm2-135m/cpu/fp16-lora/generation/capital-raw.json"]
    doc = json.loads((out / "benchmark-gpu.json").read_text())
    assert [r["synthetic"]["name"] for r in doc["synthetic"]] == ["tiny-llama"]
    assert {s["name"].split(" ")[0] for s in doc["real"]["steps"]} >= {"record", "cpu", "harness-calibrate"}
    assert [d["golden_class"] for d in doc["real"]["cross_device"]] == ["cpu", "cpu"]
    md = (out / "benchmark-gpu.md").read_text()
    assert "DRY RUN on CPU" in md and "## tiny-llama" in md and "| nf4 | 2 x 32 -> 4 |" in md
    assert "### cpu goldens judged on cpu" in md

    assert _digest(ROOT / "golden") == golden_before
    assert (_digest(ROOT / ".gpu-carry") if (ROOT / ".gpu-carry").is_dir() else None) == carry_before
