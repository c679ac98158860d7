"""The variants a model is tested in: 16-bit or NF4, each with or without the LoRA adapter.

A VariantSpec is pure data: building one touches neither disk, network nor GPU.
Its ``key`` is filesystem-safe and appears in node ids and golden paths. ``fp16`` names the
model's 16-bit half precision, not float16 itself: which one (float16 or bfloat16) is the
model's (``sources.ResolvedModel.half``), so the key and the golden paths stay the same while
the summary says what each variant ran in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Quant = Literal["fp16", "nf4"]

ALL_KEYS: tuple[str, ...] = ("fp16", "nf4", "fp16-lora", "nf4-lora")
# Execution order: the pool keeps one variant loaded at a time, so items are
# sorted by this order and each variant loads once.
RUN_ORDER: tuple[str, ...] = ("fp16", "fp16-lora", "nf4", "nf4-lora")


@dataclass(frozen=True)
class VariantSpec:
    """How to load the model: quantization and whether the adapter is applied."""

    quant: Quant
    lora: bool

    @property
    def key(self) -> str:
        return self.quant + ("-lora" if self.lora else "")

    @property
    def base(self) -> VariantSpec:
        """The same variant without the adapter (the reference an adapter is compared to)."""
        return VariantSpec(self.quant, False)

    @classmethod
    def from_key(cls, key: str) -> VariantSpec:
        if key not in ALL_KEYS:
            raise ValueError(f"unknown variant {key!r}; known: {', '.join(ALL_KEYS)}")
        quant, _, lora = key.partition("-")
        return cls(quant, bool(lora))  # type: ignore[arg-type]

    def __str__(self) -> str:
        return self.key


def parse_variants(text: str | None, *, adapter_known: bool) -> list[VariantSpec]:
    """``--variants`` as specs in run order; ``-lora`` ones need a known adapter."""
    if not text:
        keys = [k for k in RUN_ORDER if adapter_known or not k.endswith("-lora")]
        return [VariantSpec.from_key(k) for k in keys]
    wanted = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [k for k in wanted if k not in ALL_KEYS]
    if unknown:
        raise ValueError(
            f"--variants: unknown variant {unknown[0]!r}; choose from {','.join(ALL_KEYS)}"
        )
    if not adapter_known and any(k.endswith("-lora") for k in wanted):
        raise ValueError(
            "--variants asks for a -lora variant but no adapter is known for this model; "
            "pass --adapter PATH or set `adapter:` on its registry entry"
        )
    return [VariantSpec.from_key(k) for k in RUN_ORDER if k in wanted]
