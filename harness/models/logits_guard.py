"""One guard for every check: a loaded variant whose logits are NaN or infinite fails, naming its dtype.

Most current models ship in bfloat16, and some overflow float16 (largest value 65504): an
activation that leaves the range becomes inf, the next norm turns it into NaN, and every score
after it is NaN. Checks would then compare NaN with NaN, or record it. So the pool puts this
guard on every variant it loads: a forward hook on the output head, which every forward pass
and every decoding step goes through (with or without a LoRA adapter), whichever check runs it.
Where the logits of an unpadded row hold NaN or +inf (or -inf for every token: no distribution
left) the forward raises ``NonFiniteLogits``, whose message names the dtype the model ran in,
the dtype it ships in, and the fix.

Two things are left to the checks that own them:

- rows with padding: NaN only where a row is padded is an attention-mask fault (an eager kernel
  softmaxing a fully masked row), which the padding and batch checks name as such;
- models a check derives from the variant (a deep copy to merge an adapter into, a float32
  copy): the guard stays with the model the pool loaded, and the check judges what it built.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

from harness.errors import HarnessError


class NonFiniteLogits(HarnessError):
    """The logits of a loaded variant are NaN or infinite on an unpadded input."""


@dataclass(frozen=True)
class Precision:
    """What the guard's message needs to know about a loaded variant."""

    model: str  # the model's name, as in node ids and golden paths
    variant: str  # the variant key (fp16, nf4-lora, ...)
    dtype: str  # the half precision the model runs in (float16, bfloat16)
    why: str  # where that dtype came from (the registry entry, config.json)
    shipped: str | None  # what config.json says the model ships in
    quantized: bool = False  # NF4: 4-bit matmuls computing in bfloat16, the other layers in ``dtype``


def message(p: Precision, *, what: str) -> str:
    """One paragraph: what was non-finite, in which dtype, why that dtype, and what to do."""
    ran = f"NF4 with bfloat16 compute and {p.dtype} elsewhere" if p.quantized else p.dtype
    head = (f"{p.model} [{p.variant}]: the model's logits are {what} in {ran} ({p.why}), on an unpadded input, "
            "so nothing this variant scores can be judged or recorded.")
    if p.dtype == "float16" and p.shipped == "bfloat16":
        return (f"{head} This model ships in bfloat16 (its config.json), and its activations overflow float16's "
                "range (65504). Fix: set dtype: bfloat16 in its registry entry (or remove dtype there: a model's "
                "own bfloat16 is followed), then record its goldens in bfloat16 with --snapshot-update.")
    if p.dtype == "float16":
        return (f"{head} float16 holds values up to 65504; a model trained in bfloat16 can exceed that, and its "
                "activations become inf, then NaN. Fix: if the model was trained in bfloat16, run it in bfloat16: "
                "set dtype: bfloat16 in its registry entry (a --model folder: add it to models.yaml with path: and "
                "dtype: bfloat16), then record its goldens with --snapshot-update. If it works in float16 "
                "elsewhere, its weights hold NaN or inf, or a kernel is broken (try attn_implementation: eager).")
    return (f"{head} {p.dtype} has float32's range (about 3e38), so this is no overflow of a half precision: the "
            "weights hold NaN or inf (a damaged or diverged checkpoint), or a kernel is broken. Fix: check the "
            "checkpoint's tensors for NaN/inf, and try another attention kernel (attn_implementation: eager).")


@dataclass
class LogitsGuard:
    """The hooks on one loaded model; ``alarms`` keeps every error raised, for the session to see even where a
    check caught it."""

    precision: Precision
    alarms: list[NonFiniteLogits] = field(default_factory=list)
    _full_rows: Any = None
    _handles: list[Any] = field(default_factory=list)

    def attach(self, model: Any) -> bool:
        """Hook ``model`` (a transformers causal LM, before any adapter); False where it has no output head."""
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is None:
            return False
        owner = weakref.ref(head)
        decoder = _decoder(model)
        if decoder is not None:
            inner = weakref.ref(decoder)

            def remember_mask(module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
                if module is inner():
                    self._full_rows = _unpadded_rows(kwargs.get("attention_mask"))

            self._handles.append(decoder.register_forward_pre_hook(remember_mask, with_kwargs=True))

        def check(module: Any, _args: Any, output: Any) -> None:
            # a deep copy of the model carries this hook too: only the loaded model's own head is judged here
            if module is owner():
                rows, self._full_rows = self._full_rows, None
                self.check(output, rows)

        self._handles.append(head.register_forward_hook(check))
        return True

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def check(self, logits: Any, full_rows: Any = None) -> None:
        """Raise ``NonFiniteLogits`` where a row without padding (``full_rows``: a mask over the batch, None: all
        rows) has a NaN or +inf logit, or -inf for every token at a position.

        Every forward pays two reductions per row (max and min carry NaN and infinities), no copy of the
        logits: a memory budget measures the model, not the guard.
        """
        import torch

        if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.dim() < 2:
            return
        per_row = logits.reshape(logits.shape[0], -1)
        suspect = ~(torch.isfinite(per_row.amax(dim=-1)) & torch.isfinite(per_row.amin(dim=-1)))
        if full_rows is not None and full_rows.shape[0] == logits.shape[0]:
            suspect &= full_rows.to(suspect.device)
        if not bool(suspect.any()):
            return
        rows = logits[suspect]
        # -inf alone is a token ruled out (probability 0), which some models write on purpose; NaN, +inf or a
        # position with no possible token is no distribution at all
        nan, pos = torch.isnan(rows), torch.isposinf(rows)
        bad = int((nan | pos).sum())
        dead = int(torch.isneginf(rows).all(dim=-1).sum())
        if not bad and not dead:
            return
        values = f"{bad} of {rows.numel()} values in {int(suspect.sum())} row(s)"
        what = (f"NaN ({values})" if bool(nan.any()) else f"infinite ({values})" if bad else
                f"-inf for every token ({dead} position{'s' if dead > 1 else ''})")
        error = NonFiniteLogits(message(self.precision, what=what))
        self.alarms.append(error)
        raise error


def _decoder(model: Any) -> Any:
    """The decoder stack a causal LM calls with the attention mask (None where it has no ``get_decoder``)."""
    try:
        decoder = model.get_decoder()
    except (AttributeError, NotImplementedError, TypeError):
        return None
    import torch

    return decoder if isinstance(decoder, torch.nn.Module) and decoder is not model else None


def _unpadded_rows(mask: Any) -> Any:
    """Rows of a 2-D attention mask that attend to every position; None (every row) for any other mask."""
    import torch

    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return mask.bool().all(dim=-1)
    return None
