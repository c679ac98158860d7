"""scripts/gpu-bench.sh: the GPU half, prepared. Its dry run takes every step on CPU, so the tool
cannot fail on a typo once it reaches a GPU host."""

from __future__ import annotations

import hashlib
import importlib
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
    """The tool's bundle module, imported the way scripts/gpu-bench.sh runs it (``scripts/`` on the path)."""
    if str(ROOT / "scripts") not in sys.path:
        sys.path.insert(0, str(ROOT / "scripts"))
    return importlib.import_module("gpu_bench.bundle")


def _wheel(folder: Path, name: str, files: dict[str, bytes]) -> None:
    with zipfile.ZipFile(folder / name, "w") as zf:
        for member, data in files.items():
            zf.writestr(member, data)


def test_the_packages_are_bundled_as_one_tree_without_other_platforms_bitsandbytes(tmp_path: Path) -> None:
    gpu_bench = _script()
    wheels = tmp_path / "whl"
    wheels.mkdir()
    libs = {f"bitsandbytes/libbitsandbytes_{v}.so": b"x" * 10 for v in ("cpu", "cuda118", "cuda128", "cuda130",
                                                                      "cuda132", "rocm64", "xpu2025")}
    _wheel(wheels, "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl",
           {"bitsandbytes/__init__.py": b"", **libs, "bitsandbytes-0.50.2.dist-info/METADATA": b"Name: bitsandbytes"})
    for dist in [d for d in gpu_bench.NEEDED.values() if d != "bitsandbytes"]:
        _wheel(wheels, f"{dist}-1.0-py3-none-any.whl", {f"{dist}/__init__.py": b""})
    site = gpu_bench.build_site(wheels, tmp_path / "bundle" / "site.tar.gz")
    with tarfile.open(tmp_path / "bundle" / "site.tar.gz") as tar:
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
    with pytest.raises(gpu_bench.StepFailed, match="give --max-part-mb above 0"):
        gpu_bench.split_file(tmp_path / "w.whl", tmp_path, part_bytes=0, stem="x")


def test_a_bundled_file_is_cut_only_past_the_limit_and_comes_back_verified(tmp_path: Path) -> None:
    gpu_bench = _script()
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    data = os.urandom(10_000)
    (bundle / "w.whl").write_bytes(data)
    entry = {"file": "w.whl", "sha256": hashlib.sha256(data).hexdigest(),
             "parts": gpu_bench.fit(bundle / "w.whl", max_part=20_000)}
    assert [p["file"] for p in entry["parts"]] == ["w.whl"]
    entry["parts"] = gpu_bench.fit(bundle / "w.whl", max_part=4096)
    assert [p["file"] for p in entry["parts"]] == ["w.whl.part1", "w.whl.part2", "w.whl.part3"]
    assert not (bundle / "w.whl").exists()
    assert gpu_bench.join_parts(bundle, entry, tmp_path / "host" / "w.whl").read_bytes() == data
    (bundle / "w.whl.part2").write_bytes(b"damaged")
    with pytest.raises(gpu_bench.StepFailed, match="w.whl.part2: sha256 differs"):
        gpu_bench.join_parts(bundle, entry, tmp_path / "again.whl")
    (bundle / "w.whl.part3").unlink()
    with pytest.raises(gpu_bench.StepFailed, match="missing w.whl.part3 of w.whl. Fix: copy them over"):
        gpu_bench.join_parts(bundle, entry, tmp_path / "again.whl")


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_dry_run_takes_every_step_on_cpu(tmp_path: Path, embedded_model_dir: Path) -> None:
    """pack -> install -> synthetic (tiny config, four variants) -> receive -> real (one prompt, fp16-lora) -> doc,
    in temporary folders: the goldens and .gpu-bundle/ of the repository are not touched. The bundle is packed
    for a transfer limit of 60 MiB, so the embedded wheel (93 MB) is cut into parts and reassembled."""
    golden_before = _digest(ROOT / "golden")
    bundle_before = _digest(ROOT / ".gpu-bundle") if (ROOT / ".gpu-bundle").is_dir() else None
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-bench.sh"), "all", "--dry-run", "--out", str(out),
                           "--work", str(work), "--max-part-mb", "60"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
                          check=False)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    for step in ("pack", "install", "synthetic", "receive", "real"):
        assert f"gpu-bench: == {step} (dry run)" in log and f"gpu-bench: == {step} done" in log
    manifest = json.loads((work / "bundle" / "manifest.json").read_text())
    assert len(manifest["wheel"]["parts"]) >= 2
    assert all(p.stat().st_size <= 60 * 2**20 for p in (work / "bundle").iterdir())
    assert "reassembled, sha256 matches the pin" in log
    assert "model.safetensors: identical to the file the CPU goldens were recorded with" in log
    assert "MEASURED CROSS-DEVICE FACTOR: cpu goldens of smollm2-135m judged on cpu" in log
    # the dry run's variant (fp16-lora: the adapter path), in both directions
    assert log.count("  fp16-lora: cross-device / same-device noise: mean |Δ log p| x") >= 2

    names = sorted(p.name for p in out.iterdir())
    assert names == ["benchmark-gpu.json", "benchmark-gpu.md", "benchmark-gpu.png", "calibration.tar.gz",
                     "golden-cpu.tar.gz", "gpu-bench.log", "synthetic.tar.gz"]
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
    assert (_digest(ROOT / ".gpu-bundle") if (ROOT / ".gpu-bundle").is_dir() else None) == bundle_before
