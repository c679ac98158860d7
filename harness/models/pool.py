"""ModelPool: loads each variant at most once per session and keeps one in memory.

Loading follows the order lm-eval's ``HFLM._create_model`` uses: quantization
config, then ``from_pretrained``, then the adapter. Failures are remembered per
variant so that every item of a broken variant reports the same reason quickly
while the other variants still run.
"""

from __future__ import annotations

import gc
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.models.devices import Device
from harness.errors import AdapterError, HarnessError, ModelLoadError
from harness.models.logits_guard import LogitsGuard, NonFiniteLogits, Precision
from harness.models.placement import Placement, describe_bytes, offloaded_input_problem, placement_bytes
from harness.models.sources import ResolvedModel
from harness.models.variants import VariantSpec


class VariantUnavailable(HarnessError):
    """This variant cannot run on this machine (not a failure: items skip)."""


@dataclass
class Loaded:
    """A loaded variant and what it cost."""

    variant: VariantSpec
    model: Any
    seconds: float
    weights_bytes: int
    placement: dict[str, int] | None = None  # bytes per device, where accelerate spread the model


@dataclass
class ModelPool:
    resolved: ResolvedModel
    device: Device
    notes: list[str] = field(default_factory=list)
    load_counts: Counter[str] = field(default_factory=Counter)
    load_seconds: dict[str, float] = field(default_factory=dict)
    weights_bytes: dict[str, int] = field(default_factory=dict)
    _current: Loaded | None = None
    _tokenizer: Any = None
    _failed: dict[str, HarnessError] = field(default_factory=dict)
    _observations: dict[tuple[str, str], Any] = field(default_factory=dict)
    loader: Callable[[VariantSpec], Any] | None = None
    attn_implementation: str | None = None  # overrides the registry's (--attn-implementation, calibration)
    placement: Placement | None = None  # device_map over GPUs, CPU and disk; None: all on ``device``
    placements: dict[str, dict[str, int]] = field(default_factory=dict)
    dtypes: dict[str, str] = field(default_factory=dict)  # what each loaded variant ran in, for the summary
    logit_alarms: list[NonFiniteLogits] = field(default_factory=list)  # every non-finite-logits error raised

    @property
    def requested_attn(self) -> str | None:
        """The attention kernel asked of transformers; None leaves its default (SDPA)."""
        return self.attn_implementation or self.resolved.entry.attn_implementation

    # -- tokenizer -----------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = self._load_tokenizer()
        return self._tokenizer

    def _load_tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        entry = self.resolved.entry
        tok = AutoTokenizer.from_pretrained(
            str(self.resolved.path), trust_remote_code=entry.trust_remote_code
        )
        if tok.pad_token is None:
            if tok.eos_token is None:
                raise ModelLoadError(
                    f"Model {self.resolved.name!r}: the tokenizer has neither a pad nor an eos "
                    "token, so batches cannot be padded. Fix: set pad_token in tokenizer_config.json."
                )
            tok.pad_token = tok.eos_token
            self.notes.append(
                f"tokenizer has no pad token: using eos {tok.eos_token!r} (id {tok.eos_token_id}) for padding"
            )
        return tok

    # -- variants ------------------------------------------------------------
    def get(self, variant: VariantSpec) -> Loaded:
        """The loaded variant, loading it (and freeing the previous one) when needed."""
        __tracebackhide__ = True
        if self._current is not None and self._current.variant == variant:
            return self._current
        if variant.key in self._failed:
            raise self._failed[variant.key]
        self.release()
        try:
            self._current = self._load(variant)
        except HarnessError as exc:
            self._failed[variant.key] = exc
            raise
        return self._current

    def release(self) -> None:
        """Free the loaded variant (and the GPU cache) before the next one loads."""
        if self._current is None:
            return
        self._current = None
        gc.collect()
        if self.device.is_cuda:
            import torch

            torch.cuda.empty_cache()

    def observe(self, variant: VariantSpec, key: str, fn: Callable[[Loaded], Any]) -> Any:
        """Memoize ``fn`` on a variant: references (drift, savings) are measured once."""
        cache_key = (variant.key, key)
        if cache_key not in self._observations:
            self._observations[cache_key] = fn(self.get(variant))
        return self._observations[cache_key]

    def _load(self, variant: VariantSpec) -> Loaded:
        if variant.quant == "nf4":
            reason = nf4_unsupported_reason(self.device)
            if reason:
                raise VariantUnavailable(f"NF4 is not available on {self.device.description}: {reason}")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        start = time.perf_counter()
        try:
            model = self.loader(variant) if self.loader else self._from_pretrained(variant)
        except HarnessError:
            raise
        except Exception as exc:  # noqa: BLE001 - one clear paragraph instead of a deep traceback
            if variant.quant == "nf4" and self.placement is not None and _is_offload_refusal(exc):
                raise self._nf4_offload_error(variant, "transformers refused to load it") from None
            if _is_oom(exc):
                raise ModelLoadError(
                    f"Out of memory while loading {self.resolved.name!r} as {variant.key} on "
                    f"{self.device.description}: {str(exc).splitlines()[0]}. The other variants still run. "
                    "Fix: free memory, use --variants to pick fewer, or a smaller model."
                ) from None
            raise ModelLoadError(
                f"Loading {self.resolved.name!r} ({self.resolved.path}) as {variant.key} failed: "
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            ) from None
        self.dtypes[variant.key] = self._guard(model, variant)
        if variant.lora:
            model = self._apply_adapter(model)
        model.eval()
        seconds = time.perf_counter() - start
        footprint = int(model.get_memory_footprint())
        held = placement_bytes(model) if self.placement is not None else None
        problem = offloaded_input_problem(model) if held else None
        if problem:
            assert self.placement is not None
            raise ModelLoadError(
                f"{variant.key}: {self.resolved.name!r} with {self.placement.describe()}: {problem} "
                f"(held on {describe_bytes(held)}). Fix: raise max_memory for the first device so that at "
                "least the input embedding fits there.")
        if variant.quant == "nf4" and held and any(d == "disk" or (d == "cpu" and self.device.is_cuda) for d in held):
            raise self._nf4_offload_error(variant, f"its layers were placed on {describe_bytes(held)}")
        self.load_counts[variant.key] += 1
        self.load_seconds[variant.key] = seconds
        self.weights_bytes[variant.key] = footprint
        if held:
            self.placements[variant.key] = held
        return Loaded(variant, model, seconds, footprint, held)

    def _guard(self, model: Any, variant: VariantSpec) -> str:
        """Put the non-finite-logits guard on the model as loaded (before any adapter); what it runs in, in words."""
        half = self.resolved.half
        ran = running_dtype(model)
        why = half.why if ran == half.dtype else "as the loader built it"
        precision = Precision(model=self.resolved.name, variant=variant.key, dtype=ran, why=why, shipped=half.shipped,
                              quantized=variant.quant == "nf4")
        if not LogitsGuard(precision, alarms=self.logit_alarms).attach(model):
            self.notes.append(f"{variant.key}: the model has no output head to guard, so NaN or infinite logits "
                              "are left to each check to find")
        return f"NF4 (bfloat16 compute, {ran} elsewhere)" if variant.quant == "nf4" else ran

    def _nf4_offload_error(self, variant: VariantSpec, what: str) -> ModelLoadError:
        assert self.placement is not None
        return ModelLoadError(
            f"{variant.key}: {self.resolved.name!r} in NF4 does not fit {self.placement.describe()} on "
            f"{self.device.description}, and NF4 cannot be offloaded ({what}): bitsandbytes' 4-bit layers cannot "
            "run from disk, nor from the CPU beside a GPU, and transformers would keep offloaded layers "
            f"unquantized, which is not NF4. The {variant.key} items are not judged with this placement. Fix: "
            "raise max_memory so that the 4-bit model fits the devices, or run the 16-bit variants alone "
            "(--variants fp16,fp16-lora) with this placement and the NF4 ones where they fit."
        )

    def _from_pretrained(self, variant: VariantSpec) -> Any:
        import torch
        from transformers import AutoModelForCausalLM

        entry = self.resolved.entry
        kwargs: dict[str, Any] = {
            "dtype": getattr(torch, self.resolved.half.dtype),
            "device_map": self.device.name,
            "trust_remote_code": entry.trust_remote_code,
            "use_safetensors": not entry.allow_pickle or None,
        }
        if self.placement is not None:
            try:
                kwargs.update(self.placement.from_pretrained_kwargs(self.device.name))
            except ValueError as exc:
                raise ModelLoadError(f"{self.resolved.name!r}: {exc}.") from None
        if variant.quant == "nf4":
            kwargs["quantization_config"] = nf4_config()
        if self.requested_attn:
            kwargs["attn_implementation"] = self.requested_attn
        return AutoModelForCausalLM.from_pretrained(str(self.resolved.path), **kwargs)

    def _apply_adapter(self, model: Any) -> Any:
        adapter = self.resolved.adapter
        if adapter is None:
            raise AdapterError(
                f"Variant needs a LoRA adapter but none is known for {self.resolved.name!r}. "
                "Fix: pass --adapter PATH or set `adapter:` in the registry."
            )
        # a dispatched base is dispatched again with the adapter: peft needs the same limits and folder
        dispatch = self.placement.from_pretrained_kwargs(self.device.name) if self.placement is not None else None
        return load_adapter(model, adapter, model_name=self.resolved.name, dispatch=dispatch)


def running_dtype(model: Any) -> str:
    """The half precision a loaded model's unquantized layers hold (its input embeddings' dtype)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    dtype = weight.dtype if weight is not None else getattr(model, "dtype", "unknown")
    return str(dtype).removeprefix("torch.")


def has_room(device: Device, nbytes: int) -> bool:
    """Whether a second model of ``nbytes`` fits beside what is loaded (with room for activations)."""
    if device.is_cuda:
        import torch

        free, _ = torch.cuda.mem_get_info(device.name)
    else:
        import psutil

        free = psutil.virtual_memory().available
    return free >= 2 * nbytes


def make_room(other: ModelPool, *, room: Callable[[Device, int], bool] = has_room) -> None:
    """Two pools in one session (reference mode): free ``other``'s model unless a second one fits.

    Each pool keeps one variant loaded; where memory is short, the two models load
    one at a time (and reload per item) instead of running out of memory.
    """
    loaded = other._current
    if loaded is not None and not room(other.device, loaded.weights_bytes):
        other.release()


def nf4_config() -> Any:
    """NF4 with double quantization and bfloat16 compute: the QLoRA recipe."""
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


_NF4_PROBE: dict[str, str | ModelLoadError | None] = {}


def nf4_unsupported_reason(device: Device) -> str | None:
    """None when bitsandbytes can quantize to NF4 on ``device``; else why this platform cannot.

    A platform that cannot run NF4 (bitsandbytes absent, no kernel for this device) is a
    reason to skip; a broken install (an import error inside bitsandbytes, an exception in
    quantize or dequantize) is not: it raises ModelLoadError with the real error, so the
    nf4 items fail instead of turning green by skipping. Probed once per device.
    """
    if device.name not in _NF4_PROBE:
        _NF4_PROBE[device.name] = _probe_nf4(device)
    outcome = _NF4_PROBE[device.name]
    if isinstance(outcome, ModelLoadError):
        raise outcome
    return outcome


def _probe_nf4(device: Device) -> str | ModelLoadError | None:
    def first_line(exc: BaseException) -> str:
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"

    def broken(exc: BaseException) -> ModelLoadError:
        return ModelLoadError(
            f"NF4 cannot load: bitsandbytes is installed but broken on this machine ({first_line(exc)}). "
            "This is not a platform without NF4 support, so the nf4 items fail rather than skip. "
            "Fix: reinstall it (`python -m pip install --force-reinstall bitsandbytes`) and run "
            "`python -m bitsandbytes` to see its diagnostics."
        )

    try:
        import bitsandbytes  # noqa: F401
    except ModuleNotFoundError as exc:
        if exc.name == "bitsandbytes":
            return "bitsandbytes is not installed"
        return broken(exc)
    except Exception as exc:  # noqa: BLE001 - whatever breaks inside bitsandbytes' import
        return broken(exc)
    try:
        import bitsandbytes.functional as bnbf
    except Exception as exc:  # noqa: BLE001
        return broken(exc)
    import torch

    try:
        probe = torch.randn(64, 64, dtype=torch.bfloat16, device=device.name)
        packed, state = bnbf.quantize_4bit(probe, quant_type="nf4", compress_statistics=True)
        bnbf.dequantize_4bit(packed, state)
    except NotImplementedError as exc:  # the dispatcher has no kernel for this device
        return f"bitsandbytes has no NF4 kernel for {device.name} ({first_line(exc)})"
    except Exception as exc:  # noqa: BLE001 - a kernel that exists and fails is a broken install
        return ModelLoadError(
            f"NF4 cannot load: bitsandbytes failed to quantize a test tensor on {device.description} "
            f"({first_line(exc)}). The nf4 items fail rather than skip: a broken install is not a "
            "platform without NF4. Fix: reinstall bitsandbytes for this torch and device, and run "
            "`python -m bitsandbytes`."
        )
    return None


def _is_offload_refusal(exc: BaseException) -> bool:
    """transformers' refusal to put quantized layers on the CPU or disk (bitsandbytes cannot run them there)."""
    return isinstance(exc, ValueError) and "dispatched on the CPU or the disk" in str(exc)


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or "out of memory" in str(exc).lower()


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
