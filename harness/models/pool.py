"""ModelPool: loads each variant at most once per session and keeps one in memory.

Loading follows the order lm-eval's ``HFLM._create_model`` uses: quantization
config, then ``from_pretrained``, then the adapter (checked and applied by
``adapters.py``). Failures are remembered per variant so that every item of a
broken variant reports the same reason quickly while the other variants still run.
"""

from __future__ import annotations

import gc
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from harness.models.devices import Device
from harness.errors import AdapterError, HarnessError, ModelLoadError
from harness.models.logits_guard import LogitsGuard, NonFiniteLogits, Precision
from harness.models.adapters import load_adapter
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
