"""Near-tie budgets across goldens: flips that each look like noise, counted together.

Each greedy item reports the flips it accepted and, per step of its golden, how likely benign
noise flips that step (``Allowance.flip_probabilities``). One golden's budget is judged in
the item; this ledger judges each group of goldens (a suite's goldens in one variant) at the end
of the session: a change to decoding or numerics that flips every close call spreads a few
flips over many goldens, each within its own budget, and only the count over the group shows
it. Built from test reports, so it is the same under pytest-xdist.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import NamedTuple

from harness.judge.allowance import FLIP_ALPHA, flip_budget

FLIPS_PROPERTY = "harness_flips"


def flips_property(group: str, flips: int, probabilities: list[float]) -> tuple[str, str]:
    """The user property an item reports: its group, its accepted flips, its steps' flip probabilities."""
    return FLIPS_PROPERTY, json.dumps({"group": group, "flips": flips,
                                       "p": [round(p, 5) for p in probabilities if p >= 1e-5]})


class GroupTotal(NamedTuple):
    """One group's flips: accepted, over how many goldens, explained on average, the budget, which items."""

    group: str
    flips: int
    goldens: int
    explained: float
    budget: int
    where: str


@dataclass
class FlipLedger:
    groups: dict[str, dict[str, tuple[int, list[float]]]] = field(default_factory=dict)

    def add(self, nodeid: str, value: str) -> None:
        try:
            data = json.loads(value)
            group, flips, probabilities = str(data["group"]), int(data["flips"]), [float(p) for p in data["p"]]
        except (ValueError, KeyError, TypeError):
            return
        self.groups.setdefault(group, {})[nodeid] = (flips, probabilities)

    def totals(self) -> list[GroupTotal]:
        """Each group's accepted flips against what its goldens' recorded noise explains."""
        out = []
        for group, items in sorted(self.groups.items()):
            probabilities = [p for _, ps in items.values() for p in ps]
            worst = sorted(((f, node) for node, (f, _) in items.items() if f), reverse=True)
            out.append(GroupTotal(group=group, flips=sum(f for f, _ in items.values()), goldens=len(items),
                                  explained=sum(probabilities), budget=flip_budget(probabilities),
                                  where=", ".join(f"{node.split('::')[-1]} {f}" for f, node in worst)))
        return out

    def exceeded(self) -> list[str]:
        """One line per group whose flips exceed the 1-in-1/alpha tail of what its goldens' noise explains."""
        return [f"{t.group}: {t.flips} near-ties accepted over {t.goldens} goldens ({t.where}); their recorded noise "
                f"explains {t.explained:.2g} on average and at most {t.budget} at 1 in {round(1 / FLIP_ALPHA)}"
                for t in self.totals() if t.flips > t.budget]

    def standing(self) -> list[str]:
        """One line per group: how many near-ties its passing goldens accepted against how many their noise
        allows, so a green run says how much it forgave and how close it came to failing on that count (a
        failing golden's flips are in its own failure, not here)."""
        return [f"{t.group}: {t.flips} near-ties accepted over {t.goldens} passing goldens, budget {t.budget} (the "
                f"1-in-{round(1 / FLIP_ALPHA)} tail of the {t.explained:.2g} their recorded noise explains on average)"
                for t in self.totals()]
