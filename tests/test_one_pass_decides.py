"""The default greedy verdict: one pass where it decides, a real decode wherever it does not.

``harness.judge.path_noise.undecided`` says when one forward pass over a golden's path may stand
for a decode. Its docstring argues that a decisive pass implies the decode reproduces the
golden and passes, given that the decode's scores differ from the pass's by at most one noise
unit (a bound / ``FACTOR``). These tests check that argument on synthetic score rows, and that
each way of not deciding is caught.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from harness.judge.allowance import as_allowance  # noqa: E402
from harness.judge.compare import compare  # noqa: E402
from harness.judge.path_noise import HEADROOM, undecided  # noqa: E402
from harness.judge.tolerance import DEFAULT_TOLERANCES  # noqa: E402
from harness.observe.observation import Observation, step_from_scores  # noqa: E402

STEPS, VOCAB = 12, 16


def _observation(rows: torch.Tensor, path: list[int] | None = None) -> Observation:
    """The steps of ``rows`` along ``path`` (default: each row's argmax, a free greedy run)."""
    path = path if path is not None else rows.argmax(-1).tolist()
    return Observation(prompt_ids=(1,), steps=tuple(step_from_scores(r, t) for r, t in zip(rows, path)),
                       stop="length")


def _golden_rows(seed: int) -> torch.Tensor:
    """Random rows, each with a leader ahead by about 2 nats (now and then within the near-tie gap)."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(STEPS, VOCAB, generator=generator) * 0.5
    rows[torch.arange(STEPS), torch.randint(0, VOCAB, (STEPS,), generator=generator)] += 2.5
    return rows


@pytest.mark.parametrize("quant", ["fp16", "nf4"])
def test_a_decisive_one_pass_means_the_decode_reproduces_the_golden_and_passes(quant):
    allowance = as_allowance(DEFAULT_TOLERANCES[quant], STEPS)
    # the decode's own difference from the pass (KV cache vs one forward): one noise unit at most, worst signs
    unit = min(allowance.step_bound(0), allowance.margin_bound(0), allowance.mean_bound([0] * STEPS)) / 3
    decided = undecided_count = 0
    for seed in range(300):
        golden_rows = _golden_rows(seed)
        golden = _observation(golden_rows)
        scale = (seed % 10) * allowance.step_bound(0) / 6  # from identical to well past the bounds
        noise = torch.randn(STEPS, VOCAB, generator=torch.Generator().manual_seed(10_000 + seed))
        pass_rows = golden_rows + scale * noise
        scored = _observation(pass_rows, list(golden.token_ids)).steps
        if undecided(scored, golden, allowance) is not None:
            undecided_count += 1
            continue
        decided += 1
        assert compare(golden, _observation(pass_rows, list(golden.token_ids)), allowance).ok
        for k in range(4):
            signs = torch.randint(0, 2, (STEPS, VOCAB), generator=torch.Generator().manual_seed(k)) * 2 - 1
            decoded = _observation(pass_rows + signs * unit / 2)
            assert decoded.token_ids == golden.token_ids, seed
            verdict = compare(golden, decoded, allowance)
            assert verdict.ok and not verdict.accepted_ties, (seed, verdict.reasons)
    assert decided >= 30 and undecided_count >= 30  # both sides of the rule were exercised


def _pass(golden_rows: torch.Tensor, golden: Observation, change: torch.Tensor) -> tuple:
    return _observation(golden_rows + change, list(golden.token_ids)).steps


def test_each_way_of_not_deciding_sends_the_item_to_a_decode():
    allowance = as_allowance(DEFAULT_TOLERANCES["fp16"], STEPS)
    rows = torch.zeros(STEPS, VOCAB)
    rows[:, 0], rows[:, 1] = 10.0, 5.0  # token 0 leads by 5 nats everywhere: far from any near-tie
    golden = _observation(rows)
    assert undecided(_pass(rows, golden, torch.zeros_like(rows)), golden, allowance) is None

    flip = torch.zeros_like(rows)
    flip[3, 1] = 6.0  # the pass prefers token 1 at step 3
    assert "prefers another token" in undecided(_pass(rows, golden, flip), golden, allowance)

    close = torch.zeros_like(rows)
    close[5, 1] = 5.0 - allowance.margin_bound(5) / 2  # still the golden token, by less than the gap
    assert "near-tie gap" in undecided(_pass(rows, golden, close), golden, allowance)

    used = torch.zeros_like(rows)  # the margin moves by more than HEADROOM of its bound, still far from a tie
    used[7, 1] = -(HEADROOM + 0.1) * allowance.margin_bound(7)
    assert "allowance" in undecided(_pass(rows, golden, used), golden, allowance)

    assert "does not cover" in undecided(_pass(rows, golden, torch.zeros_like(rows))[:-1], golden, allowance)


def test_a_margin_moved_beyond_the_headroom_is_decoded_even_where_the_pass_is_decisive():
    """A moved margin is what a regression looks like: the decode, not the pass, gives its verdict."""
    allowance = as_allowance(DEFAULT_TOLERANCES["nf4"], STEPS)
    rows = torch.zeros(STEPS, VOCAB)
    rows[:, 0], rows[:, 1] = 10.0, 5.0
    rows[2, 1] = 9.9  # the golden was a near-tie at step 2
    golden = _observation(rows)
    lifted = torch.zeros_like(rows)
    lifted[2, 1] = -4.9  # this model is decisive there: the margin moved, and by more than the headroom
    assert "allowance" in undecided(_pass(rows, golden, lifted), golden, allowance)
