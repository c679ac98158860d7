"""Activation fingerprints: where a model changed, from a golden's sidecar alone.

A greedy golden's sidecar keeps, per module (embedding, each layer's norms, attention
and MLP, final norm, head), four numbers over three prompt positions: the RMS of the
module's output, and three projections of its RMS-normalized rows onto fixed ±1
directions. In RMS units a projection moves by about the relative change of the
output. Next to them (format 3), a noise record: one number per module, how far it
moved when the same model ran the prompt with its other attention kernel at record
time. Each module is judged against its own noise (kernel noise grows with depth and
differs between models and machines); the first module above its threshold, in
execution order, is where behaviour first changes. Layer outputs are left out: a
layer's output only changes if its input, attention or MLP did. One line of text per
layer, in both blocks, keeps a sidecar at about 6 KB.

The directions come from integer hashing, not a random generator, so a torch upgrade
cannot move every fingerprint at once.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.observe.activations import capture, layer_index
from harness.judge.tolerance import CROSS_DEVICE_FACTOR

FINGERPRINT_VERSION = 3
READABLE_VERSIONS = (2, 3)  # 2: no noise record, judged with the constants
POSITIONS = 3
PROJECTIONS = 3
# Thresholds, in the fingerprint's units (largest of: relative RMS change, projection change in
# RMS units). With a noise record: changed above max(NOISE_FACTOR x the module's recorded noise,
# NOISE_FLOOR of the compute dtype; the floor covers dtype rounding and the printed digits where
# the kernels agree, e.g. before the first attention). Without one (format 2, or no second
# kernel): FINGERPRINT_NOISE per quantization, fitted to SmolLM2-135M alone.
# Measured on SmolLM2-135M, CPU (2 threads, AVX512), the 7 prompts of suites/generation.yaml,
# recorded with sdpa. Prompts localized correctly, constants -> noise record ("+n" or "a+b":
# n, b more named one layer late). Benign, must be "no change": eager at judge time; 1 thread, and
# ATEN_CPU_CAPABILITY=avx2, each in a fresh process. Changed: Gaussian noise of 2% / 5% of the
# weights' std on layer 14's mlp.down_proj and layer 5's self_attn.o_proj; the pirate adapter's
# lora_B x1.1 / x1.5 (first change: layer 0 attention).
#   case          fp16        fp16-lora   nf4         nf4-lora
#   benign (x3)   7 -> 7      7 -> 7      7 -> 7      7 -> 7     (worst: 0.75, 0.83, 0.72, 0.76 of threshold)
#   mlp14 2%      7 -> 6 (+1) 7 -> 7      0 -> 7      0 -> 5 (+2)
#   mlp14 5%      7 -> 7      7 -> 7      3 -> 7      3 -> 6 (+1)
#   attn5 2%      4 -> 7      3 -> 7      1 -> 7      0 -> 7
#   attn5 5%      7 -> 7      7 -> 7      4 -> 7      2 -> 7
#   lora_B x1.1   -           0+5 -> 7    -           0 -> 0 (+5)
#   lora_B x1.5   -           6+1 -> 7    -           0+3 -> 6 (+1)
# Benign moves reach 2.5x the recorded noise at a module (float16: 0.003 where the floor
# applies; bfloat16: 0.019), hence 3 and the floors; FACTOR 4 keeps more margin but loses about
# a third of the NF4 2% cases. Left: a lora_B x1.1 rescale moves NF4's layer 0 attention by
# 0.005-0.017, under bfloat16 rounding, so it is named at layer 1; 2% noise in NF4 localizes on
# every prompt but some only just (1.02x threshold), 5% with at least 1.8x.
FINGERPRINT_NOISE = {"fp16": 2e-2, "nf4": 1.5e-1}
NOISE_FACTOR = 3.0
NOISE_FLOOR = {"float32": 4e-3, "float16": 4e-3, "bfloat16": 2.5e-2}  # float32: not measured
NOTE = "localization"


class FingerprintError(ValueError):
    """A recorded fingerprint this version cannot read (edited by hand, or another format)."""


@dataclass(frozen=True)
class NoiseRule:
    """When a module counts as changed: above its own recorded noise, or the constant without one.

    Kernel noise grows with depth and differs between models and machines, so a sidecar
    recorded with a noise record is judged module by module; older ones use the constant.
    """

    quantization: str
    dtype: str = "float16"
    cross_device: bool = False
    factor: float = NOISE_FACTOR

    @property
    def scale(self) -> float:
        return CROSS_DEVICE_FACTOR if self.cross_device else 1.0

    @property
    def constant(self) -> float:
        return FINGERPRINT_NOISE.get(self.quantization, max(FINGERPRINT_NOISE.values())) * self.scale

    @property
    def floor(self) -> float:
        return NOISE_FLOOR.get(self.dtype, max(NOISE_FLOOR.values())) * self.scale

    def threshold(self, recorded: float | None) -> tuple[float, str]:
        """(threshold, why) for a module whose recorded noise is ``recorded`` (None: none recorded)."""
        cross = f", x{CROSS_DEVICE_FACTOR:g} cross-device (assumed, not measured)" if self.cross_device else ""
        if recorded is None:
            return self.constant, f"the {self.quantization} constant, no noise recorded{cross}"
        scaled = self.factor * recorded * self.scale
        if scaled >= self.floor:
            return scaled, f"{self.factor:g} x recorded noise {recorded:.2g}{cross}"
        return self.floor, f"the {self.dtype} floor, recorded noise {recorded:.2g}{cross}"


def fingerprint_noise(quantization: str, *, dtype: str = "float16", cross_device: bool = False) -> NoiseRule:
    return NoiseRule(quantization, dtype, cross_device)


def picked_positions(tokens: int, positions: int = POSITIONS) -> list[int]:
    """First, middle and last token: the first is an attention sink, the last sees the whole prompt."""
    return sorted({0, tokens // 2, tokens - 1})[:positions] if tokens else []


def ids_digest(ids: list[int]) -> str:
    return hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()[:16]


def fingerprint(model: Any, input_ids: list[int], *, positions: int = POSITIONS) -> dict[str, Any]:
    """The fingerprint of ``model`` on ``input_ids`` (one forward pass), ready for a sidecar."""
    ids = list(input_ids)
    picked = picked_positions(len(ids), positions)
    store = capture(model, ids, rows=picked)
    modules: dict[str, str] = {}
    parts: list[str] = []
    for name, rows in store.items():
        index = layer_index(name)
        if name.endswith(".output"):
            continue
        text = " ".join(_summary(rows))
        if index is None:
            modules[name] = text
            continue
        key, part = f"layers.{index}", name.rsplit(".", 1)[-1]
        if index == 0:
            parts.append(part)
        modules[key] = f"{modules[key]} | {text}" if key in modules else text
    return {"version": FINGERPRINT_VERSION, "tokens": len(ids), "positions": picked, "ids_sha256": ids_digest(ids),
            "layer_parts": parts, "columns": f"rms, then {PROJECTIONS} projections of the rows in RMS units",
            "modules": modules}


def _summary(rows: Any) -> list[str]:
    """RMS of the rows, then projections of each row divided by its own RMS (RMS units)."""
    import torch

    rms = float(rows.pow(2).mean().sqrt())
    unit = rows / rows.pow(2).mean(dim=-1, keepdim=True).sqrt().clamp_min(1e-30)
    flat = unit.flatten()
    signs = _signs(flat.numel(), torch)
    projections = (signs @ flat / math.sqrt(flat.numel())).tolist()
    return [f"{rms:.4g}"] + [f"{p:.3f}" for p in projections]


def _signs(width: int, torch: Any) -> Any:
    """PROJECTIONS fixed ±1 directions of ``width``, from an integer hash (version-independent)."""
    index = torch.arange(width, dtype=torch.int64)
    rows = []
    for k in range(PROJECTIONS):
        h = (index * 0x9E3779B1 + (k + 1) * 0x85EBCA77) & 0xFFFFFFFF
        h = h ^ (h >> 15)
        h = (h * 0x2C1B3C6D) & 0xFFFFFFFF
        h = h ^ (h >> 12)
        rows.append((h & 1).to(torch.float32) * 2 - 1)
    return torch.stack(rows)


def module_rows(fp: dict[str, Any], *, width: int = 1 + PROJECTIONS) -> list[tuple[str, list[float]]]:
    """(canonical module name, ``width`` numbers) in execution order; FingerprintError if it does not parse."""
    if not isinstance(fp, dict):
        raise FingerprintError(f"it is a JSON {type(fp).__name__}, not an object")
    if fp.get("version") not in READABLE_VERSIONS:
        raise FingerprintError(f"it has format {fp.get('version')!r}, this harness reads "
                               f"{' and '.join(map(str, READABLE_VERSIONS))}")
    modules, parts = fp.get("modules"), fp.get("layer_parts")
    if not isinstance(modules, dict) or not isinstance(parts, list) or not all(isinstance(p, str) for p in parts):
        raise FingerprintError("its modules or layer_parts have the wrong type")
    found: list[tuple[tuple[int, int], str, list[float]]] = []
    for key, text in modules.items():
        if not isinstance(text, str):
            raise FingerprintError(f"module {key!r} is not a line of numbers")
        groups = text.split(" | ")
        index = layer_index(key + ".")
        if index is not None and len(groups) != len(parts):
            raise FingerprintError(f"{key} has {len(groups)} groups of numbers, layer_parts names {len(parts)}")
        for rank, group in enumerate(groups):
            try:
                numbers = [float(v) for v in group.split()]
            except ValueError:
                raise FingerprintError(f"{key} holds something other than numbers: {group[:40]!r}") from None
            if len(numbers) != width:
                raise FingerprintError(f"{key} has {len(numbers)} numbers per module, expected {width}")
            if index is not None:
                found.append(((index, rank), f"{key}.{parts[rank]}", numbers))
            else:
                found.append(({"embedding": (-1, 0), "norm": (1 << 30, 0)}.get(key, (1 << 30, 1)), key, numbers))
    return [(name, numbers) for _, name, numbers in sorted(found, key=lambda row: row[0])]


def recorded_noise(fp: dict[str, Any]) -> dict[str, float] | None:
    """Per module, how far a benign kernel switch moved it at record time; None without a record."""
    record = fp.get("noise")
    if not isinstance(record, dict) or "modules" not in record:
        return None
    try:
        rows = module_rows({**fp, "modules": record["modules"]}, width=1)
    except FingerprintError as exc:
        raise FingerprintError(f"its noise record: {exc}") from None
    return {name: numbers[0] for name, numbers in rows}


def differences(expected: dict[str, Any], actual: dict[str, Any]) -> list[tuple[str, float]]:
    """(module, how far it moved in RMS units), expected's modules in execution order; inf if missing."""
    theirs = dict(module_rows(actual))
    rows: list[tuple[str, float]] = []
    for name, exp in module_rows(expected):
        act = theirs.get(name)
        if act is None:
            rows.append((name, float("inf")))
            continue
        changes = [abs(act[0] - exp[0]) / max(abs(exp[0]), 1e-30)] + [abs(a - e) for e, a in zip(exp[1:], act[1:])]
        rows.append((name, math.nan if any(map(math.isnan, changes)) else max(changes)))
    return rows


def localize(fp_expected: dict[str, Any], fp_actual: dict[str, Any], rule: NoiseRule) -> str:
    """"behaviour first changes at layer 14 (mlp) ...", "before layer 0: ..." or "no change ..."."""
    from harness.judge.localize import describe

    if fp_expected.get("ids_sha256") != fp_actual.get("ids_sha256"):
        return "before layer 0: the tokenizer (the prompt encodes to different token ids)"
    noise = recorded_noise(fp_expected)
    for name, moved in differences(fp_expected, fp_actual):
        level, why = rule.threshold(None if noise is None else noise.get(name))
        if not moved <= level:  # NaN counts as changed
            where = "before layer 0: the tokenizer or embeddings" if name == "embedding" else describe(name)
            return f"{where} (fingerprint moved {moved:.3g} x RMS, threshold {level:.3g}: {why})"
    return "no change beyond noise at any layer"


def with_noise(fp: dict[str, Any], model: Any, input_ids: list[int]) -> dict[str, Any]:
    """``fp`` with its noise record: per module, how far the other attention kernel moves it.

    In the modules' line layout (one number per module), so a sidecar stays a few KB. Where
    the model cannot switch kernels, the record says why and the constants judge it.
    """
    from harness.models.introspect import KernelSwitchError, other_attention

    try:
        with other_attention(model) as method:
            benign = fingerprint(model, input_ids)
    except KernelSwitchError as exc:
        return {**fp, "noise": {"method": f"none, judged with the constant: {exc}"}}
    return {**fp, "noise": noise_record(fp, benign, f"attention kernel {method}")}


def noise_record(fp: dict[str, Any], benign: dict[str, Any], method: str) -> dict[str, Any]:
    """How far each module of ``fp`` moved in ``benign`` (same model, benign change), in its line layout."""
    moved = dict(differences(fp, benign))
    lines: dict[str, str] = {}
    for key in fp["modules"]:
        names = [f"{key}.{part}" for part in fp["layer_parts"]] if layer_index(key + ".") is not None else [key]
        lines[key] = " | ".join(f"{moved[name]:.2g}" if math.isfinite(moved[name]) else "inf" for name in names)
    return {"method": f"{method}, one number per module", "modules": lines}


def recorded(sidecar: Path) -> dict[str, Any] | None:
    """The fingerprint a sidecar holds, None when it holds none; FingerprintError when unreadable."""
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FingerprintError(f"the sidecar {sidecar.name} does not parse ({exc})") from None
    fp = meta.get("fingerprint") if isinstance(meta, dict) else None
    if fp is not None:
        module_rows(fp)
        recorded_noise(fp)
    return fp


def sidecar_localization(sidecar: Path, model: Any, input_ids: list[int], *, rule: NoiseRule,
                         caveat: str = "") -> str:
    """One line for a failing golden: where ``model`` first differs from the model that recorded it.

    Never raises for what a sidecar holds: an old golden without a fingerprint, or a damaged
    one, gets a one-line note instead.
    """
    label = f"{NOTE} (activation fingerprint vs the recording model{caveat})"
    try:
        old = recorded(sidecar)
    except FingerprintError as exc:
        return f"{NOTE}: the recorded fingerprint cannot be read ({exc}); re-record to enable localization"
    if old is None:
        return f"{NOTE}: no fingerprint recorded; re-record to enable localization"
    try:
        return f"{label}: {localize(old, fingerprint(model, input_ids), rule)}"
    except ValueError as exc:  # an architecture whose layers cannot be found
        return f"{NOTE}: not possible for this model ({exc})"


def sidecar_fingerprint(sidecar: Path, model: Any, input_ids: list[int], *, rule: NoiseRule) -> dict[str, Any]:
    """What an update writes into a sidecar: ``{"fingerprint": ...}``, with its noise record.

    A recorded fingerprint with a noise record (format 3) is kept when the current one is the
    same within that noise, so that re-recording on another machine does not churn
    sidecars; {} where none can be taken.
    """
    try:
        new = fingerprint(model, input_ids)
    except ValueError:
        return {}
    try:
        old = recorded(sidecar)
    except FingerprintError:
        old = None
    if old is not None and "noise" in old and localize(old, new, rule).startswith("no change"):
        return {"fingerprint": old}
    return {"fingerprint": with_noise(new, model, input_ids)}
