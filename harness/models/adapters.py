"""LoRA adapters: the folder checked from its files alone, then applied and checked for a real effect.

Kept apart from the pool because three callers need the folder check without a model
(the command-line options, ``harness-diff``, the tools' argument checks) and
``save_reload`` loads an adapter into a model the pool does not own. peft only warns
on missing keys and zero weights; each check here turns such a silent no-op into an
``AdapterError`` that names what is wrong in the adapter.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from harness.errors import AdapterError


def adapter_config(adapter: Path) -> dict[str, Any]:
    """The adapter's settings, after checking the folder without loading anything (no torch, no peft).

    Everything the files alone can tell is said here, naming what is wrong in the adapter:
    a missing or unreadable config, a missing peft_type or one that is not LoRA, pickle weights,
    a rank ``r`` that its tensors do not have. What needs the base model (a tensor that does
    not fit it) is ``load_adapter``'s to say.
    """
    if not adapter.is_dir():
        raise AdapterError(
            f"Adapter {adapter}: {'this is a file' if adapter.exists() else 'no such folder'}; an adapter is a "
            "folder with adapter_config.json and adapter_model.safetensors. Fix: pass that folder."
        )
    config_file = adapter / "adapter_config.json"
    if not config_file.is_file():
        raise AdapterError(
            f"Adapter {adapter}: no adapter_config.json there, so it is not a peft adapter folder. "
            "Fix: point --adapter (or the registry's `adapter:`) at the folder save_pretrained wrote."
        )
    weights = adapter / "adapter_model.safetensors"
    if not weights.is_file():
        pickled = [p.name for p in adapter.glob("adapter_model.*")]
        raise AdapterError(
            f"Adapter {adapter}: no adapter_model.safetensors"
            + (f" (found {', '.join(pickled)}: pickle adapters are refused, they can run code when loaded)"
               if pickled else "") + ". Fix: save the adapter with save_pretrained(safe_serialization=True)."
        )
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"Adapter {adapter}: adapter_config.json is not valid JSON ({exc}).") from None
    if not isinstance(config, dict):
        raise AdapterError(
            f"Adapter {config_file}: adapter_config.json holds a {type(config).__name__}, not a mapping of "
            "settings (peft_type, r, target_modules, ...). Fix: restore the file save_pretrained wrote."
        )
    peft_type = config.get("peft_type")
    if peft_type is None:
        raise AdapterError(
            f"Adapter {config_file}: adapter_config.json has no peft_type, so peft cannot tell what kind of adapter "
            f"this is (it holds {', '.join(sorted(config)) or 'no settings at all'}). Fix: restore the file "
            "save_pretrained wrote (a LoRA adapter's has peft_type: LORA, r, lora_alpha, target_modules)."
        )
    if str(peft_type).upper() != "LORA":
        raise AdapterError(
            f"Adapter {adapter} is a {peft_type} adapter (peft_type in adapter_config.json); the harness applies "
            "LoRA adapters only (the -lora variants, merge_and_unload). Fix: pass a LoRA adapter, or run the "
            "variants without -lora."
        )
    _check_rank(adapter, weights, config)
    return config


def _check_rank(adapter: Path, weights: Path, config: dict[str, Any]) -> None:
    """The rank the config declares is the rank of the tensors (read from the safetensors header)."""
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise AdapterError(f"Adapter {adapter}: adapter_config.json has r = {rank!r}; a LoRA rank is a whole "
                           "number of at least 1. Fix: restore the file save_pretrained wrote.")
    if config.get("rank_pattern"):
        return  # per-module ranks: peft checks them against the tensors when it loads
    header = _safetensors_header(weights)
    for key, info in header.items():
        shape = info.get("shape") if isinstance(info, dict) else None
        if ".lora_A." in key and isinstance(shape, list) and shape and shape[0] != rank:
            raise AdapterError(
                f"Adapter {adapter}: adapter_config.json declares r = {rank}, but its tensors have rank {shape[0]} "
                f"(first: {key}, shape {shape}): the config and the weights come from different trainings. This is "
                "a fault of the adapter, whatever the base model. Fix: save the adapter again with save_pretrained "
                "so that both files match."
            )


def _safetensors_header(weights: Path) -> dict[str, Any]:
    """Tensor names, dtypes and shapes: the JSON header that starts a safetensors file."""
    import struct

    try:
        with weights.open("rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            if length > 100_000_000:
                raise ValueError(f"a header of {length} bytes")
            header = json.loads(fh.read(length))
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as exc:
        raise AdapterError(f"Adapter {weights.parent}: adapter_model.safetensors is not a safetensors file "
                           f"({type(exc).__name__}: {exc}). Fix: save the adapter again with save_pretrained.") from None
    return header if isinstance(header, dict) else {}


def load_adapter(model: Any, adapter: Path, *, model_name: str, dispatch: dict[str, Any] | None = None) -> Any:
    """Apply a LoRA adapter, refusing ones that do not fit or that change nothing.

    ``dispatch`` (device_map, max_memory, offload_folder) for a base spread by accelerate:
    peft re-dispatches the model with the adapter, and without them would move every
    offloaded weight onto one device.
    """
    from peft import PeftModel

    config = adapter_config(adapter)
    trained_for = config.get("base_model_name_or_path") or "unknown"
    try:
        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False, **(dispatch or {}))
    except Exception as exc:  # noqa: BLE001
        detail = str(exc).strip().splitlines()
        first = next((line for line in detail if "size mismatch" in line), detail[0] if detail else "")
        raise AdapterError(
            f"Adapter {adapter} (trained for base {trained_for!r}) does not fit model "
            f"{model_name!r}: {type(exc).__name__}: {first.strip()[:300]}. "
            "Fix: use an adapter trained on this base model, or pass the matching --model."
        ) from None
    _assert_keys_match(model, adapter, model_name=model_name)
    _assert_adapter_loaded(model, adapter, model_name=model_name, trained_for=trained_for)
    return model


def _assert_keys_match(model: Any, adapter: Path, *, model_name: str) -> None:
    """peft only warns on missing keys: compare the file's tensors with the layers peft created.

    A layer whose ``lora_A`` (or ``lora_B``) is missing from the file keeps its random (or
    zero) initialisation, which a zero check alone cannot see.
    """
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as handle:
        in_file = set(handle.keys())
    # save_embedding_layers=False: no hub lookup; full embedding tensors are not LoRA layers anyway
    expected = set(get_peft_model_state_dict(model, save_embedding_layers=False))
    missing = sorted(expected - in_file)
    unused = sorted(key for key in in_file - expected if "lora_" in key)
    if not missing and not unused:
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} of the {len(expected)} tensors its LoRA layers need are missing from the file "
                     f"(first: {missing[0]})")
    if unused:
        parts.append(f"{len(unused)} tensors in the file match no LoRA layer (first: {unused[0]})")
    raise AdapterError(
        f"Adapter {adapter} did not load into {model_name!r}: " + "; ".join(parts) + ". Those layers would run "
        "with an untrained initialisation. Fix: re-save the adapter from the trained model "
        "(save_pretrained), and check target_modules in adapter_config.json against the file."
    )


def _assert_adapter_loaded(model: Any, adapter: Path, *, model_name: str, trained_for: str) -> None:
    """peft only warns on missing keys; a lora_B left at its zero init means they did not load.

    A LoRA tensor offloaded by accelerate (a meta tensor in memory) is judged by its tensor in
    the file, which ``_assert_keys_match`` tied to the model's LoRA layers.
    """
    import torch

    zero: list[str] = []
    nonfinite: list[str] = []
    total = 0
    offloaded = False
    for name, param in model.named_parameters():
        if "lora_" in name and param.device.type == "meta":
            offloaded = True
            total += "lora_B" in name
            continue
        if "lora_" in name and not bool(torch.isfinite(param.detach()).all()):
            nonfinite.append(name)
        if "lora_B" in name:
            total += 1
            if not param.detach().float().abs().max().item() > 0:
                zero.append(name)
    if offloaded:
        file_zero, file_nonfinite = _bad_lora_tensors_in_file(adapter)
        zero, nonfinite = zero + file_zero, nonfinite + file_nonfinite
    if nonfinite:
        raise AdapterError(
            f"Adapter {adapter} holds NaN or infinite weights in {len(nonfinite)} LoRA tensors (first: {nonfinite[0]}), "
            "so every output through them is NaN. The training diverged or the file was damaged. Fix: re-save the "
            "adapter from a healthy checkpoint."
        )
    if total == 0:
        raise AdapterError(
            f"Adapter {adapter} added no LoRA layers to {model_name!r} (trained for {trained_for!r}). "
            "Fix: check target_modules in adapter_config.json."
        )
    if zero:
        raise AdapterError(
            f"Adapter {adapter} did not load into {model_name!r}: {len(zero)} of {total} lora_B "
            f"weights are still zero (first: {zero[0]}), so their keys are missing from the file or "
            "the adapter is a no-op. Fix: re-save the adapter from the trained model."
        )


def _bad_lora_tensors_in_file(adapter: Path) -> tuple[list[str], list[str]]:
    """(all-zero lora_B tensors, LoRA tensors with NaN or inf) of the adapter's file."""
    import torch
    from safetensors import safe_open

    zero: list[str] = []
    nonfinite: list[str] = []
    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as handle:
        for key in handle.keys():
            if "lora_" not in key:
                continue
            tensor = handle.get_tensor(key).float()
            if not bool(torch.isfinite(tensor).all()):
                nonfinite.append(key)
            elif "lora_B" in key and not tensor.abs().max().item() > 0:
                zero.append(key)
    return zero, nonfinite
