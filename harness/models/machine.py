"""Where a run ran: the machine conditions that change a model's numbers without any change to the model.

The same model and adapter give different logits on different CPUs: torch picks its vectorized kernels
by CPU capability (AVX2, AVX-512), bitsandbytes runs 4-bit layers through a fused bfloat16 kernel only
on CPUs with AVX512-BF16 (repacking the weights at the first forward) and dequantizes then multiplies
elsewhere, and the summation order follows the thread count. A red gate must say at once whether the
machine changed, so this module describes them (recorded in golden sidecars under ``numerics``, shown
in the terminal summary and ``--harness-report``) and words how a run differs from what its goldens
were recorded with. ``harness.models.provenance.describe_changes`` uses the same wording in a failure.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

NUMERICS_KEY = "numerics"
NOT_RECORDED = "not recorded"
CAPABILITY_VARIABLE = "ATEN_CPU_CAPABILITY"  # torch's override of the kernels it dispatches to
CPUINFO = Path("/proc/cpuinfo")

# (key in the numerics dict, label for people); the CPU's name is shown, never compared: cloud runners
# of one kind carry several names for CPUs with the same features.
FIELDS: tuple[tuple[str, str], ...] = (
    ("cpu", "CPU"),
    ("avx512f", "AVX-512"),
    ("avx512_bf16", "AVX512-BF16"),
    ("amx", "AMX"),
    ("torch_cpu_capability", "torch CPU capability"),
    ("threads", "torch threads"),
    ("bnb_4bit_kernel", "bitsandbytes 4-bit kernel"),
)
SHOWN_ONLY = frozenset({"cpu"})

# bitsandbytes' CPU paths for a 4-bit layer (its backends/cpu/ops.py), as recorded and shown
FUSED_KERNELS = "fused AVX512-BF16 matmul in bfloat16 on repacked weights (kernels-community gemm_4bit_forward)"
FUSED_NATIVE = "fused AVX512-BF16 matmul in bfloat16 on repacked weights (bitsandbytes' native gemv_4bit)"
DEQUANT_NATIVE = "dequantize (bitsandbytes' native CPU library), then matmul"
DEQUANT_TORCH = "dequantize in torch ops, then matmul (no native bitsandbytes library)"
REFERENCE_PACKED = ("torch reference kernel in bfloat16 on repacked weights, standing in for the fused one "
                    "(HARNESS_4BIT_LAYOUT=cpu-packed on a CPU without AVX512-BF16)")


@dataclass(frozen=True)
class Row:
    """One line of "this run vs the goldens": a label, this run's value, the recorded value(s)."""

    label: str
    current: str
    recorded: str
    differs: bool


@lru_cache(maxsize=1)
def library_versions() -> dict[str, str]:
    """The libraries whose releases move a model's numbers (and ``python``), as installed."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    # kernels: where it loads, bitsandbytes takes its fused CPU 4-bit matmul from it
    for dist in ("torch", "transformers", "peft", "bitsandbytes", "tokenizers", "accelerate", "kernels"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "absent"
    return out


def numerics(device_type: str = "cpu") -> dict[str, Any]:
    """This process's numerics on ``device_type`` (``cpu``, ``cuda``): JSON-ready, for sidecars and reports.

    Threads are read on every call (an xdist worker sets its share after start-up); the rest once.
    """
    return {**_fixed_numerics(device_type), "threads": _torch_threads()}


@lru_cache(maxsize=None)
def _fixed_numerics(device_type: str) -> dict[str, Any]:
    features = cpu_features()
    return {
        "cpu": cpu_name(),
        "avx512f": features.get("avx512f"),
        "avx512_bf16": features.get("avx512_bf16"),
        "amx": features.get("amx"),
        "torch_cpu_capability": torch_cpu_capability(),
        "aten_cpu_capability": os.environ.get(CAPABILITY_VARIABLE) or None,
        "bnb_4bit_kernel": bnb_4bit_kernel(device_type),
    }


def cpu_features(*, cpuinfo: Path = CPUINFO) -> dict[str, bool | None]:
    """The instruction sets that select other kernels, as torch's cpuinfo sees them (any OS), else as
    Linux's /proc/cpuinfo lists them; None where neither says."""
    try:
        import torch

        probe = torch.cpu
        return {
            "avx512f": bool(probe._is_avx512_supported()),
            "avx512_bf16": bool(probe._is_avx512_bf16_supported()),
            "amx": bool(probe._is_amx_tile_supported()),
        }
    except (ImportError, AttributeError, RuntimeError):  # an older torch, or another architecture's build
        pass
    flags = _proc_cpuinfo_flags(cpuinfo)
    if flags is None:
        return {"avx512f": None, "avx512_bf16": None, "amx": None}
    return {"avx512f": "avx512f" in flags, "avx512_bf16": "avx512_bf16" in flags, "amx": "amx_tile" in flags}


def _proc_cpuinfo_flags(path: Path) -> set[str] | None:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return None


def cpu_name() -> str:
    """The CPU's marketing name where the OS says it (Linux: /proc/cpuinfo), else the platform's word."""
    try:
        for line in CPUINFO.read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def torch_cpu_capability() -> str:
    """The vectorized kernels torch dispatches to (``ATEN_CPU_CAPABILITY`` lowers it), e.g. ``AVX2``."""
    try:
        import torch

        return str(torch.backends.cpu.get_cpu_capability())
    except (ImportError, AttributeError, RuntimeError) as exc:
        return f"unknown ({type(exc).__name__})"


def _torch_threads() -> int | None:
    torch = sys.modules.get("torch")
    return int(torch.get_num_threads()) if torch is not None and hasattr(torch, "get_num_threads") else None


def bnb_4bit_kernel(device_type: str) -> str:
    """Which kernel runs a 4-bit layer's matmul here, read from what bitsandbytes registered.

    bitsandbytes registers its fused CPU kernel only where its native library finds AVX512-BF16, and
    then takes the kernel from the ``kernels`` package when it can (else its own); elsewhere it
    dequantizes each weight and multiplies in the compute dtype. A session on the packed layout
    (``harness.run.cpu_packed``) on another CPU runs a torch stand-in for the fused kernel, said as such.
    """
    try:
        import importlib

        import bitsandbytes
    except Exception as exc:  # noqa: BLE001 - not installed, or its library failed to load: say which
        return f"bitsandbytes unavailable ({type(exc).__name__})"
    if device_type != "cpu":
        return f"bitsandbytes {getattr(bitsandbytes, '__version__', '')} {device_type} kernels".replace("  ", " ")
    packed_run = sys.modules.get("harness.run.cpu_packed")  # loaded as a plugin only: never imported from here
    if packed_run is not None and getattr(packed_run, "_library", None) is not None:
        return REFERENCE_PACKED
    try:
        from bitsandbytes.cextension import ErrorHandlerMockBNBNativeLibrary, lib

        ops = vars(importlib.import_module("bitsandbytes.backends.cpu.ops"))
    except (ImportError, AttributeError) as exc:  # another bitsandbytes layout than 0.48-0.50's
        return f"unknown for bitsandbytes {getattr(bitsandbytes, '__version__', '?')} ({type(exc).__name__})"
    if isinstance(lib, ErrorHandlerMockBNBNativeLibrary):
        return DEQUANT_TORCH
    if "gemm_4bit_forward_kernel" in ops:  # defined only where has_avx512bf16() held at import
        return FUSED_KERNELS if ops["gemm_4bit_forward_kernel"] is not None else FUSED_NATIVE
    return DEQUANT_NATIVE


def describe(values: dict[str, Any] | None) -> str:
    """One line for people: ``CPU: AMD EPYC; AVX-512: no; ...; bitsandbytes 4-bit kernel: ...``."""
    if not values:
        return NOT_RECORDED
    return "; ".join(f"{label}: {_shown(key, values)}" for key, label in FIELDS)


def _shown(key: str, values: dict[str, Any]) -> str:
    """A field as people read it; torch's capability says when ``ATEN_CPU_CAPABILITY`` chose it."""
    word = _word(values.get(key))
    override = values.get("aten_cpu_capability")
    if key == "torch_cpu_capability" and override:
        return f"{word} ({CAPABILITY_VARIABLE}={override})"
    return word


def _word(value: Any) -> str:
    if value is None:
        return "unknown"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def numerics_changes(recorded: Any, current: Any) -> list[str]:
    """A failure's lines on the machine: what differs from the golden's sidecar, or that it did not record it."""
    if not isinstance(current, dict):
        return []
    if not isinstance(recorded, dict):
        return [f"this machine's numerics were not recorded with this golden (recorded by an older harness); "
                f"this run: {describe(current)}"]
    moved = [f"{label} {_shown(key, recorded)} -> {_shown(key, current)}"
             for key, label in FIELDS
             if key not in SHOWN_ONLY and key in recorded and recorded.get(key) != current.get(key)]
    if not moved:
        return []
    return ["the machine's numerics differ from the golden's (outputs can move with them, the model need not "
            "have changed): " + ", ".join(moved)]


def versus(current: dict[str, Any], recorded: Iterable[dict[str, Any]]) -> list[Row]:
    """This run's provenance beside what the sidecars of the goldens it compared with recorded.

    ``recorded`` holds one provenance per sidecar; where they disagree each value is shown with its count.
    """
    sidecars = [r for r in recorded if isinstance(r, dict)]

    def plain(value: Any) -> str | None:
        return None if value is None else str(value)

    rows = [_row("device", plain(current.get("device")), [plain(r.get("device")) for r in sidecars]),
            _row("attention kernel", plain(current.get("attn_implementation")),
                 [plain(r.get("attn_implementation")) for r in sidecars])]
    versions = current.get("versions") or {}
    for dist in versions:
        rows.append(_row(dist, plain(versions.get(dist)),
                         [plain(_mapping(r, "versions").get(dist)) for r in sidecars]))
    here = current.get(NUMERICS_KEY) or {}
    for key, label in FIELDS:
        values = [_shown(key, _mapping(r, NUMERICS_KEY)) if _mapping(r, NUMERICS_KEY) else None for r in sidecars]
        rows.append(_row(label, _shown(key, here), values, compared=key not in SHOWN_ONLY))
    return rows


def _mapping(provenance: dict[str, Any], key: str) -> dict[str, Any]:
    value = provenance.get(key)
    return value if isinstance(value, dict) else {}


def _row(label: str, current: str | None, values: list[str | None], *, compared: bool = True) -> Row:
    shown = "-" if current is None else current
    if not values:
        return Row(label, shown, "no golden compared", False)
    present = [v for v in values if v is not None]
    counts = Counter(present)
    missing = len(values) - len(present)
    if not counts:
        text = NOT_RECORDED
    elif len(counts) == 1 and not missing:
        text = next(iter(counts))
    else:
        parts = [f"{value} ({n})" for value, n in counts.most_common()]
        text = ", ".join(parts + ([f"{NOT_RECORDED} ({missing})"] if missing else []))
    differs = compared and any(value != shown for value in counts)
    return Row(label, shown, text, differs)


RECORDED_FIELDS = ("device", "attn_implementation", "versions", NUMERICS_KEY)


def recorded_groups(provenances: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Sidecars' fields on where their goldens were recorded, grouped (most common first) with a count each:
    a run compares with dozens of goldens, most recorded alike, and its result file carries this list."""
    counts: Counter[str] = Counter()
    for provenance in provenances:
        counts[json.dumps({k: provenance[k] for k in RECORDED_FIELDS if k in provenance}, sort_keys=True)] += 1
    return [{"count": n, **json.loads(key)} for key, n in counts.most_common()]


def expand_groups(groups: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One provenance per golden again, from ``recorded_groups`` (or several shards' lists of them)."""
    return [group for group in groups if isinstance(group, dict) for _ in range(int(group.get("count", 1)))]


def summary_lines(current: dict[str, Any], recorded: list[dict[str, Any]]) -> list[str]:
    """The terminal's lines: this machine, then only what the goldens' sidecars say differently."""
    lines = [f"numerics: {describe(current.get(NUMERICS_KEY))}",
             "libraries: " + ", ".join(f"{k} {v}" for k, v in (current.get("versions") or {}).items())]
    if not recorded:
        return lines
    rows = versus(current, recorded)
    moved = [f"{row.label} {row.recorded} (this run {row.current})" for row in rows if row.differs]
    unrecorded = [row.label for row in rows if row.recorded == NOT_RECORDED]
    head = f"goldens compared ({len(recorded)}) were recorded with"
    if not moved and not unrecorded:
        lines.append(f"{head} the same device, attention kernel, libraries and numerics as this run")
        return lines
    if moved:
        lines.append(f"{head}: " + "; ".join(moved) + "; the rest as this run")
    if unrecorded:
        lines.append(f"not recorded with those goldens (an older harness): {', '.join(unrecorded)}")
    return lines


def markdown_lines(current: dict[str, Any], recorded: list[dict[str, Any]]) -> list[str]:
    """The report's section: one table, this run beside the goldens, rows that differ in bold."""
    lines = ["## Where this ran", "",
             f"Numerics of this run: {describe(current.get(NUMERICS_KEY))}.", ""]
    if not recorded:
        return lines + ["No golden was compared in this run.", ""]
    lines += [f"| | this run | goldens compared ({len(recorded)}) were recorded with |", "|---|---|---|"]
    for row in versus(current, recorded):
        label = f"**{row.label}**" if row.differs else row.label
        lines.append(f"| {label} | {row.current} | {row.recorded} |".replace("\n", " "))
    return lines + ["", "Rows in bold differ: a golden that fails names them; a version or kernel change can move "
                    "outputs without any change to the model.", ""]


def shard_note(headers: list[tuple[int, dict[str, Any]]]) -> list[str]:
    """A merged report's note when its shards (index, result header) ran on machines with other numerics
    (threads aside: each runner has its cores), since a verdict may then differ by CPU, not by check."""
    seen: dict[str, list[int]] = {}
    for index, header in headers:
        values = ((header.get("model") or {}).get("provenance") or {}).get(NUMERICS_KEY)
        if isinstance(values, dict):
            key = ", ".join(f"{label} {_shown(k, values)}" for k, label in FIELDS
                            if k not in SHOWN_ONLY and k != "threads")
            seen.setdefault(key, []).append(index)
    if len(seen) < 2:
        return []
    listing = "; ".join(f"shard {', '.join(map(str, shards))}: {key}" for key, shards in seen.items())
    return [f"Note: the shards ran on machines with different numerics ({listing}).", ""]


def main() -> None:
    """``python -m harness.models.machine``: this machine's numerics and libraries, as Markdown (a CI step summary)."""
    values = numerics("cpu")
    print("### Where this ran")
    print("")
    for key, label in FIELDS:
        note = " (this process; a pytest -n N worker runs its share)" if key == "threads" else ""
        print(f"- {label}: {_shown(key, values)}{note}")
    print("- libraries: " + ", ".join(f"{k} {v}" for k, v in library_versions().items()))


if __name__ == "__main__":
    main()
