"""The greedy judge: is this run's generation the golden's behaviour, and if not, why?

``GoldenJudgement`` is what ``GoldenStore.assert_matches`` calls for a greedy golden: it parses
the golden (``harness.golden.greedy_format``), runs the comparison engine
(``harness.judge.compare``) under the golden's allowance, and explains the verdict with what a
reviewer needs (settings that changed, the first divergence's top-k, the numerics' context, a
text diff). It lives apart from the check so the check only observes and records.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from harness.errors import GoldenError
from harness.golden.greedy_format import GoldenFormatError, OtherFormat, parse_golden
from harness.judge.allowance import Allowance
from harness.judge.compare import GOLDEN_SIDES, Sides, Verdict, compare, render_tokens
from harness.judge.tolerance import CROSS_DEVICE_LABEL, Tolerance
from harness.observe.observation import Observation
from harness.observe.prompts import describe_token


def describe(tol: Tolerance | Allowance) -> str:
    if isinstance(tol, Allowance):
        steps, margins = tol.step, tol.margin
        return (f"per step |Δ log p| {min(steps):.3g}-{max(steps):.3g}, margin {min(margins):.3g}-{max(margins):.3g}"
                f"{tol.describe()}")
    return (f"mean |Δ log p| {tol.mean_abs_dlogp:g}, per step {tol.max_abs_dlogp:g}, tie gap {tol.tie_gap:g}"
            f"{tol.describe()}")


def environment_changes(recorded: Any, current: Any) -> list[str]:
    """Where the golden's noise was measured vs this run: the numerics' context, shown on failure."""
    if not isinstance(recorded, dict) or not isinstance(current, dict):
        return []
    changed = [f"{k} {recorded.get(k, '(not recorded)')} -> {current.get(k, '(not recorded)')}"
               for k in sorted(set(recorded) | set(current)) if recorded.get(k) != current.get(k)]
    return [f"  numerics: recorded with {', '.join(changed)} (within the recorded noise only where the change is benign)"] \
        if changed else []


@dataclass
class GoldenJudgement:
    """Judges a greedy golden and explains the verdict (once per golden: the store asks again)."""

    observed: Observation
    tokenizer: Any
    tol: Tolerance | Allowance
    rescore: Any
    judged_against: str | None = None
    golden: Any = None  # the golden file read (named in a format error)
    update: bool = False
    sides: Sides = GOLDEN_SIDES  # how messages name the two runs (reference mode: OLD and NEW)
    localize: Callable[[], str] | None = None  # one line: where the model first changed (computed on failure only)
    recorded_environment: Any = None  # where the golden's noise was measured (kernel, ISA, threads, dtypes)
    environment: Any = None  # the same for this run
    expected: Observation | None = None
    verdict: Verdict | None = None
    problem: str | None = None
    passed: bool = False
    changes: list[str] = field(default_factory=list)
    _judged: tuple[str, tuple[int, ...]] | None = None

    def judge(self, expected: Any, actual: dict[str, Any]) -> bool:
        key = (json.dumps(expected, sort_keys=True, default=str), tuple(actual.get("new_token_ids", ())),
               json.dumps(actual.get("generation"), sort_keys=True, default=str))  # a settings change is judged too
        if self._judged == key:
            return self.passed
        self._judged = key
        self.verdict, self.problem, self.changes = None, None, []
        try:
            self.expected = parse_golden(expected)
        except OtherFormat as exc:
            if self.golden is not None and not self.update:
                raise GoldenError(f"Golden file {self.golden} cannot be judged: {exc}.") from None
            self.problem = str(exc)
            self.passed = False
            return False
        except GoldenFormatError as exc:
            self.problem = str(exc)
            self.passed = False
            return False
        self.changes = [f"{k}: {self.sides.expected_short} {expected.get(k)}, {self.sides.actual_short} {actual[k]}"
                        for k in ("prompt_tokens", "max_new_tokens") if expected.get(k) != actual[k]]
        self.verdict = compare(self.expected, self.observed, self.tol, rescore=self.rescore, sides=self.sides)
        same_ids = self.expected.token_ids == self.observed.token_ids
        if same_ids and expected.get("text") != actual["text"]:
            self.changes.append("the token ids are identical but the decoded text differs: the tokenizer's "
                                "decoding changed")
        settings = setting_changes(expected.get("generation"), actual["generation"], self.sides)
        self.passed = self.verdict.ok and not self.changes and not settings  # a changed setting fails, named
        return self.passed

    def explain(self, expected: Any, actual: dict[str, Any]) -> str:
        if self.problem is not None:
            return f"golden not judged: {self.problem}."
        lines = setting_changes(expected.get("generation"), actual["generation"], self.sides)
        lines += self.changes
        if self.verdict is not None and self.expected is not None:
            lines += [render_tokens(r, self.tokenizer) for r in self.verdict.reasons]
            lines += self._divergence_context()
            lines += [render_tokens(t.describe(sides=self.sides), self.tokenizer) for t in self.verdict.accepted_ties]
            lines.append(self.verdict.summary())
            if self.verdict.ok:
                lines.append("(the log-probabilities agree within noise)")
            else:
                lines.append(f"tolerance: {describe(self.tol)}")
                lines += environment_changes(self.recorded_environment, self.environment)
            if self.localize is not None:
                lines.append(self.localize())
        if self.judged_against:
            lines.append(f"judged against {self.judged_against} goldens, with the {CROSS_DEVICE_LABEL} tolerance")
        lines += text_diff(str(expected.get("text", "")), actual["text"])
        return "\n".join(line for line in lines if line)

    def _divergence_context(self) -> list[str]:
        """The first differing step's top-k in both runs, as a reviewer reads them."""
        assert self.expected is not None and self.verdict is not None
        first = int(self.verdict.stats.get("first_divergence", -1))
        if first < 0 or first >= min(len(self.expected.steps), len(self.observed.steps)):
            return []
        def top(step: Any) -> str:
            return ", ".join(f"{describe_token(self.tokenizer, t)} {lp:.3f}" for t, lp in step.top)
        return [f"  {self.sides.expected_short} top-{len(self.expected.steps[first].top)} at new token {first}: "
                f"{top(self.expected.steps[first])}",
                f"  {self.sides.actual_of} top-{len(self.observed.steps[first].top)}: {top(self.observed.steps[first])}"]


def setting_changes(recorded: Any, current: dict[str, Any], sides: Sides = GOLDEN_SIDES) -> list[str]:
    """Effective generation settings that differ from the golden's, named (they apply under greedy too)."""
    if not isinstance(recorded, dict):
        return []
    def plain(name: str, value: Any) -> Any:
        return [value] if name == "eos_token_id" and isinstance(value, int) else value

    lines = []
    for name in sorted(set(recorded) | set(current)):
        if plain(name, recorded.get(name)) != plain(name, current.get(name)):
            lines.append(f"generation setting {name} changed: {sides.expected_short} {recorded.get(name)!r}, "
                         f"{sides.actual_short} {current.get(name)!r} (from the model's generation_config; it applies under greedy "
                         "decoding too, so it can explain this failure)")
    return lines


def text_diff(expected: str, actual: str) -> list[str]:
    diff = list(difflib.unified_diff(expected.splitlines(), actual.splitlines(), "expected", "actual",
                                     lineterm="", n=1))
    if not diff:
        return []
    lines = ["text diff:"] + ["  " + d for d in diff[:24]]
    if len(diff) > 24:
        lines.append(f"  ... ({len(diff) - 24} more diff lines)")
    return lines
