"""Fingerprints of what produced an observation: model files, tokenizer, adapter, libraries.

Stored in golden sidecars (never compared), so that a failing comparison can
say whether the model or adapter changed since the golden was recorded.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from harness.models.machine import NUMERICS_KEY, numerics_changes
from harness.models.sources import cache_dir

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
)


# written into config.json by whichever transformers saved it (the embedded model's conversion
# included): a library fact, not the model's, and it must not make a library update read as a model change
WRITER_KEYS = ("transformers_version",)


def _content(f: Path) -> bytes:
    """A file's bytes as fingerprinted: a config.json without the keys that name its writer."""
    if f.name != "config.json":
        return f.read_bytes()
    try:
        config = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f.read_bytes()
    if not isinstance(config, dict):
        return f.read_bytes()
    return json.dumps({k: v for k, v in config.items() if k not in WRITER_KEYS}, sort_keys=True).encode()


def _sha_files(files: list[Path]) -> str | None:
    """A digest over names and contents, memoized on disk by (path, size, mtime)."""
    files = sorted(f for f in files if f.is_file())
    if not files:
        return None
    memo_file = cache_dir() / "fingerprints.json"
    try:
        memo: dict[str, str] = json.loads(memo_file.read_text())
    except (OSError, json.JSONDecodeError):
        memo = {}
    stamp = "v2|" + "|".join(f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
    if stamp in memo:
        return memo[stamp]
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode())
        if f.name == "config.json":
            digest.update(_content(f))
            continue
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    value = digest.hexdigest()[:16]
    memo[stamp] = value
    tmp = memo_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(memo))
    tmp.replace(memo_file)
    return value


@lru_cache(maxsize=None)
def model_fingerprint(folder: Path) -> str | None:
    files = [p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin")]
    return _sha_files(files + [folder / "config.json"])


@lru_cache(maxsize=None)
def tokenizer_fingerprint(folder: Path) -> str | None:
    return _sha_files([folder / name for name in TOKENIZER_FILES])


@lru_cache(maxsize=None)
def adapter_fingerprint(folder: Path | None) -> str | None:
    if folder is None:
        return None
    return _sha_files([folder / "adapter_model.safetensors", folder / "adapter_config.json"])


@lru_cache(maxsize=None)
def attn_implementation(requested: str | None, folder: Path) -> str:
    """The attention kernel a load uses: the one asked for, else the one transformers picks.

    Goldens record it because kernels differ numerically (eager vs SDPA flips near-ties).
    """
    if requested:
        return requested
    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(str(folder))
        cls = AutoModelForCausalLM._model_mapping[type(config)]
    except Exception:  # noqa: BLE001 - remote code or an unknown architecture: say so
        return "default"
    return "sdpa" if getattr(cls, "_supports_sdpa", False) else "eager"


def describe_changes(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human lines for the provenance fields that differ (model, adapter, tokenizer, versions, machine).

    Only the lines on the model, tokenizer or adapter say "changed since": the caller blames those;
    a library, device, kernel or machine difference is named beside them, never as the model's fault.
    A library the sidecar does not list was not recorded (an older harness), which is not a change.
    """
    lines: list[str] = []
    labels = {
        "model_fingerprint": "the model's weights", "tokenizer_fingerprint": "the tokenizer files",
        "adapter_fingerprint": "the adapter", "revision": "the model revision",
    }
    for key, label in labels.items():
        if key in recorded and recorded.get(key) != current.get(key):
            lines.append(f"{label} changed since this golden was recorded "
                         f"({recorded.get(key)} -> {current.get(key)})")
    old_v, new_v = recorded.get("versions", {}), current.get("versions", {})
    moved = [f"{dist} {old_v[dist]} -> {new_v.get(dist, 'absent')}"
             for dist in sorted(old_v) if old_v[dist] != new_v.get(dist, "absent")]
    if moved:
        lines.append("library versions differ from the golden's (a new release can move outputs: to tell, run "
                     "with the golden's versions; re-record only after reviewing the diff): " + ", ".join(moved))
    for key in ("device", "attn_implementation"):
        if key in recorded and recorded.get(key) != current.get(key):
            lines.append(f"{key} {recorded.get(key)} -> {current.get(key)}")
    lines += numerics_changes(recorded.get(NUMERICS_KEY), current.get(NUMERICS_KEY))
    return lines
