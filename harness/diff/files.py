"""What differs between two model folders' non-weight files, as reviewable diffs.

Tokenizer files are compared by meaning (vocabulary entries, merges, normalizer,
special and added tokens) because a 2 MB ``tokenizer.json`` shown as a text diff
is unreadable; everything else small and textual is a unified diff.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")
MAX_DIFF_LINES = 60
TEXT_LIMIT = 512 * 1024
# tokenizer.json parts compared as whole JSON values (small), apart from vocab and merges.
TOKENIZER_PARTS = ("normalizer", "pre_tokenizer", "post_processor", "decoder", "added_tokens", "truncation", "padding")
TOKENIZER_MODEL_SCALARS = ("type", "unk_token", "byte_fallback", "continuing_subword_prefix",
                           "end_of_word_suffix", "fuse_unk", "dropout", "ignore_merges")
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token",
                      "mask_token", "additional_special_tokens", "extra_special_tokens")


@dataclass
class FileChange:
    """One file that differs: its role, what changed (short lines) and a unified diff."""

    file: str
    role: str
    status: str  # "changed", "added", "removed"
    summary: list[str] = field(default_factory=list)
    diff: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"file": self.file, "role": self.role, "status": self.status, "summary": self.summary,
                "diff": self.diff}


def role_of(name: str) -> str:
    """Which part of the model a file belongs to, as a reviewer thinks of it."""
    if name == "config.json":
        return "config"
    if name == "generation_config.json":
        return "generation_config"
    if "chat_template" in name:
        return "chat_template"
    if name.startswith(("tokenizer", "special_tokens", "added_tokens", "vocab", "merges")) or name.endswith(".model"):
        return "tokenizer"
    if name.startswith("adapter_config"):
        return "adapter_config"
    return "other"


def diff_folders(old: Path, new: Path) -> list[FileChange]:
    """Every non-weight file that differs between ``old`` and ``new`` (identical files are omitted)."""
    old_files = _files(old)
    new_files = _files(new)
    changes: list[FileChange] = []
    for name in sorted(set(old_files) | set(new_files)):
        role = role_of(name)
        if name not in new_files:
            changes.append(FileChange(name, role, "removed", [f"{name} was removed"]))
        elif name not in old_files:
            changes.append(FileChange(name, role, "added", [f"{name} was added"],
                                      _unified("", _read_text(new_files[name]) or "", name)))
        elif _digest(old_files[name]) != _digest(new_files[name]) and not _same_json(old_files[name], new_files[name]):
            changes.append(diff_file(name, old_files[name], new_files[name]))
    return changes


def _files(folder: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(folder.iterdir())
            if p.is_file() and not p.name.startswith(".") and not p.name.endswith(WEIGHT_SUFFIXES)}


def _same_json(old: Path, new: Path) -> bool:
    """A re-save that only reformats a JSON file (key order, indent) is no change."""
    if not old.name.endswith(".json"):
        return False
    try:
        return bool(json.loads(old.read_bytes()) == json.loads(new.read_bytes()))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def diff_file(name: str, old: Path, new: Path) -> FileChange:
    """One changed file: by meaning for tokenizer.json and JSON configs, by text otherwise."""
    role = role_of(name)
    change = FileChange(name, role, "changed")
    if name == "tokenizer.json":
        change.summary, change.diff = diff_tokenizer_json(_load_json(old), _load_json(new))
        return change
    old_text, new_text = _read_text(old), _read_text(new)
    if old_text is None or new_text is None:
        change.summary = [f"binary file differs (sha256 {_digest(old)[:12]} -> {_digest(new)[:12]})"]
        return change
    if name.endswith(".json"):
        try:
            old_obj, new_obj = json.loads(old_text), json.loads(new_text)
        except json.JSONDecodeError:
            pass
        else:
            change.summary = diff_values(old_obj, new_obj)
            if role == "tokenizer":
                change.summary = _special_tokens_first(old_obj, new_obj, change.summary)
            old_text, new_text = _pretty(old_obj), _pretty(new_obj)
    change.diff = _unified(old_text, new_text, name)
    if not change.summary:
        change.summary = ["formatting only: the parsed content is the same"] if name.endswith(".json") \
            else [f"{len([d for d in change.diff if d[:1] in '+-' and d[:3] not in ('+++', '---')])} lines differ"]
    return change


def diff_values(old: Any, new: Any, path: str = "") -> list[str]:
    """``key.sub: old -> new`` for every leaf that differs (lists of scalars compared whole)."""
    if isinstance(old, dict) and isinstance(new, dict):
        lines: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            where = f"{path}.{key}" if path else str(key)
            if key not in new:
                lines.append(f"{where}: removed (was {_short(old[key])})")
            elif key not in old:
                lines.append(f"{where}: added ({_short(new[key])})")
            else:
                lines.extend(diff_values(old[key], new[key], where))
        return lines
    if old != new:
        return [f"{path or '(value)'}: {_short(old)} -> {_short(new)}"]
    return []


def _special_tokens_first(old: dict[str, Any], new: dict[str, Any], lines: list[str]) -> list[str]:
    special = [line for line in lines if line.split(".")[0].split(":")[0] in SPECIAL_TOKEN_KEYS]
    return [f"special token {line}" for line in special] + [line for line in lines if line not in special]


def diff_tokenizer_json(old: dict[str, Any], new: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Vocabulary, merges and the pipeline parts of a fast tokenizer, compared by meaning."""
    summary: list[str] = []
    details: list[str] = []
    old_model, new_model = old.get("model") or {}, new.get("model") or {}
    for key in TOKENIZER_MODEL_SCALARS:
        if old_model.get(key) != new_model.get(key):
            summary.append(f"model.{key}: {_short(old_model.get(key))} -> {_short(new_model.get(key))}")
    vocab_lines = _diff_vocab(old_model.get("vocab"), new_model.get("vocab"))
    if vocab_lines:
        summary.append(vocab_lines[0])
        details.extend(vocab_lines[1:])
    merge_lines = _diff_merges(old_model.get("merges"), new_model.get("merges"))
    if merge_lines:
        summary.append(merge_lines[0])
        details.extend(merge_lines[1:])
    for part in TOKENIZER_PARTS:
        if old.get(part) != new.get(part):
            if part == "added_tokens":
                summary.extend(_diff_added_tokens(old.get(part) or [], new.get(part) or []))
            else:
                summary.append(f"{part} changed")
                details.extend(_unified(_pretty(old.get(part)), _pretty(new.get(part)), f"tokenizer.json:{part}"))
    return summary or ["formatting only: vocabulary, merges and pipeline are the same"], details[:MAX_DIFF_LINES]


def _diff_vocab(old: Any, new: Any) -> list[str]:
    if old == new:
        return []
    old_map = _vocab_map(old)
    new_map = _vocab_map(new)
    added = [t for t in new_map if t not in old_map]
    removed = [t for t in old_map if t not in new_map]
    moved = [t for t in new_map if t in old_map and new_map[t] != old_map[t]]
    head = (f"vocabulary: {len(old_map)} -> {len(new_map)} entries; {len(added)} added, {len(removed)} removed, "
            f"{len(moved)} with a new id or score")
    lines = [head]
    lines += [f"+ {t!r} (id {new_map[t]})" for t in added[:10]]
    lines += [f"- {t!r} (id {old_map[t]})" for t in removed[:10]]
    lines += [f"~ {t!r}: {old_map[t]} -> {new_map[t]}" for t in moved[:10]]
    return lines


def _vocab_map(vocab: Any) -> dict[str, Any]:
    if isinstance(vocab, dict):
        return dict(vocab)
    if isinstance(vocab, list):  # unigram: [[piece, score], ...]
        return {str(item[0]): (index, item[1]) for index, item in enumerate(vocab)}
    return {}


def _diff_merges(old: Any, new: Any) -> list[str]:
    if old == new:
        return []
    norm_old = [m if isinstance(m, str) else " ".join(m) for m in old or []]
    norm_new = [m if isinstance(m, str) else " ".join(m) for m in new or []]
    if norm_old == norm_new:
        return []
    old_set, new_set = set(norm_old), set(norm_new)
    added = [m for m in norm_new if m not in old_set]
    removed = [m for m in norm_old if m not in new_set]
    head = f"merges: {len(norm_old)} -> {len(norm_new)}; {len(added)} added, {len(removed)} removed"
    if not added and not removed:
        head += " (same merges, new priority order)"
    return [head] + [f"+ merge {m!r}" for m in added[:10]] + [f"- merge {m!r}" for m in removed[:10]]


def _diff_added_tokens(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[str]:
    old_by_id = {t.get("id"): t for t in old}
    new_by_id = {t.get("id"): t for t in new}
    lines: list[str] = []
    for token_id in sorted(set(old_by_id) | set(new_by_id), key=lambda i: (i is None, i)):
        before, after = old_by_id.get(token_id), new_by_id.get(token_id)
        if before == after:
            continue
        if before is None:
            lines.append(f"added token {after.get('content')!r} (id {token_id}, special={after.get('special')})")
        elif after is None:
            lines.append(f"removed added token {before.get('content')!r} (id {token_id})")
        else:
            fields = [f"{k}: {_short(before.get(k))} -> {_short(after.get(k))}"
                      for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)]
            lines.append(f"added token id {token_id} ({before.get('content')!r}): " + "; ".join(fields))
    return lines


def _unified(old: str, new: str, name: str) -> list[str]:
    lines = list(difflib.unified_diff(old.splitlines(), new.splitlines(), f"old/{name}", f"new/{name}",
                                      lineterm="", n=2))
    if len(lines) > MAX_DIFF_LINES:
        lines = lines[:MAX_DIFF_LINES] + [f"... ({len(lines) - MAX_DIFF_LINES} more diff lines)"]
    return lines


def _read_text(path: Path) -> str | None:
    data = path.read_bytes()
    if len(data) > TEXT_LIMIT and not path.name.endswith(".json"):
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _load_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False)


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
