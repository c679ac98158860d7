"""``batch``: a prompt scored alone and inside batches of other sizes and positions agrees within noise.

Not only padding (``padding`` covers masks): a batch of equal-length prompts
needs no padding at all, yet batched matmuls pick other kernels and a model, a
quantized layer or a custom kernel that mixes rows (cross-row leakage through a
reduction, a norm or a cache indexed by the wrong row) changes a row's
distribution because of its neighbours. Each prompt's greedy path (decoded
alone) is scored in one forward pass alone, then placed first or last in
batches of the listed sizes, among other rows of the same length (``equal``,
no padding) or of other lengths (``mixed``, left-padded as generation batches
are, positions from the mask). A mixed batch always holds a row longer than the
prompt, so the prompt's own row is padded in every mixed layout, two rows
included (and, from three rows on, a shorter row is padded beside it). Every next-token distribution along the path
is compared with the lone run's by the comparison engine
(``compare_distributions``), so a changed best token is a failure unless it
is a near-tie in both runs.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from harness.checks.base import Check, CheckContext, register_check
from harness.checks.consistency import ConsistencySpec, Findings, encoded_prompts, greedy, tolerance_for
from harness.errors import CheckFailure

Position = Literal["first", "last"]
Shape = Literal["equal", "mixed"]

# Other rows are cut from this text: distinct content in every row, any length.
FILLER = (
    "The museum opens at nine on weekdays and at ten on Sundays. Tickets can be bought online or at the "
    "door, and children under twelve enter for free. The river that crosses the old town freezes in "
    "January, when the markets sell roasted chestnuts, warm bread and spiced apple juice to visitors."
)


class BatchSpec(ConsistencySpec):
    """Each prompt scored alone and inside batches of other rows must agree within noise: a model, quantized
    layer or kernel that mixes rows changes a row's distribution because of its neighbours."""

    kind: Literal["batch"]
    batch_sizes: list[int] = Field(default_factory=lambda: [4], min_length=1,
                                   description="Batch sizes to try, each 2 to 64.")
    positions: list[Position] = Field(default_factory=lambda: ["first", "last"], min_length=1,
                                      description="Where the prompt's row sits in the batch.")
    shapes: list[Shape] = Field(default_factory=lambda: ["equal", "mixed"], min_length=1, description=(
        "`equal`: other rows as long as the prompt (no padding); `mixed`: rows of other lengths, left-padded "
        "(needs a pad token)."))
    filler: str = Field(FILLER, min_length=1, description="Text the other rows are cut from.")

    @field_validator("batch_sizes")
    @classmethod
    def _sizes(cls, value: list[int]) -> list[int]:
        if any(size < 2 or size > 64 for size in value):
            raise ValueError("batch sizes must be between 2 and 64 (1 is the lone run every batch is compared with)")
        if len(set(value)) != len(value):
            raise ValueError("list each batch size at most once")
        return value

    @field_validator("positions", "shapes")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("list each value at most once")
        return value


@register_check("batch")
class BatchCheck(Check[BatchSpec]):
    Spec = BatchSpec

    def run(self, ctx: CheckContext) -> None:
        __tracebackhide__ = True
        from harness.judge.compare import compare_distributions

        model, tokenizer = ctx.model, ctx.tokenizer
        if tokenizer.pad_token_id is None and "mixed" in self.spec.shapes:
            raise CheckFailure(f"{self.spec.id}: the tokenizer has no pad token, so mixed-length batches cannot "
                               "be built. Fix: set a pad token, or use shapes: [equal].")
        tol = tolerance_for(ctx, self.spec)
        findings = Findings(self.spec.id, tokenizer)
        filler = list(tokenizer(self.spec.filler, add_special_tokens=False)["input_ids"])
        layouts = 0
        for prompt in encoded_prompts(ctx, self.spec):
            path = greedy(model, tokenizer, prompt, self.spec.max_new_tokens).token_ids
            sequence = prompt.ids + list(path[:-1])
            first_row = len(prompt.ids) - 1
            labels = [f"step {i}" for i in range(len(path))]
            alone = row_logprobs(model, [sequence], tokenizer.pad_token_id)[0][first_row:]
            for shape in self.spec.shapes:
                for size in self.spec.batch_sizes:
                    for position in self.spec.positions:
                        rows = others(filler, len(sequence), size - 1, shape)
                        at = 0 if position == "first" else size - 1
                        rows.insert(at, sequence)
                        assert shape == "equal" or len(sequence) < max(map(len, rows)), "a mixed row is padded"
                        got = row_logprobs(model, rows, tokenizer.pad_token_id)[at][first_row:]
                        layouts += 1
                        findings.add(f"prompt {prompt.label}, batch of {size} ({shape} lengths), {position} row",
                                     compare_distributions(alone, got, tol, labels=labels))
        ctx.record(batch_layouts=layouts)
        findings.finish(
            ctx, headline="a prompt scored inside a batch differs from the same prompt alone", tol=tol,
            fix="Rows of a batch must not influence each other: look for reductions over the batch "
                "dimension, caches or buffers indexed by the wrong row, or masks/positions built for the "
                "longest row. If the differences are only numerical (batched kernels), raise `tolerance`.",
        )


def others(filler: list[int], length: int, count: int, shape: Shape) -> list[list[int]]:
    """``count`` distinct rows cut from the filler: all ``length`` long, or of varied lengths.

    Mixed lengths alternate longer and shorter than ``length``, the first longer: the
    prompt's row is padded whatever the batch size, and other rows are padded too.
    """
    rows: list[list[int]] = []
    for index in range(count):
        n = length if shape == "equal" else mixed_length(length, index)
        start = (index * 7) % max(1, len(filler))
        needed = start + n
        source = filler * (needed // max(1, len(filler)) + 1)
        rows.append(source[start:start + n])
    return rows


def mixed_length(length: int, index: int) -> int:
    """The ``index``-th other row's length in a mixed batch: even indices longer, odd ones shorter."""
    if index % 2 == 0:
        return length + 3 + index
    return max(1, length // 2 - index // 2)


def row_logprobs(model: Any, rows: list[list[int]], pad_id: int | None) -> list[Any]:
    """Each row's next-token log-probs at its real positions, from one left-padded forward pass (float32)."""
    import torch

    device = next(model.parameters()).device
    width = max(len(r) for r in rows)
    pad = 0 if pad_id is None else pad_id
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
    logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
    return [logprobs[i, width - len(r):] for i, r in enumerate(rows)]

