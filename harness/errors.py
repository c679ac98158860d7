"""Errors users can act on: each renders as one paragraph naming where and how to fix."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class HarnessError(Exception):
    """Base of every error the harness raises on purpose (never a bug)."""


@dataclass
class SuiteError(HarnessError):
    """A problem in a YAML file the user wrote (suite or registry)."""

    path: Path | str
    message: str
    line: int | None = None
    key: str | None = None
    hint: str | None = None

    def __post_init__(self) -> None:
        super().__init__(self.render())

    def render(self) -> str:
        where = str(self.path)
        if self.line is not None:
            where += f":{self.line}"
        text = f"{where}: "
        if self.key:
            text += f"{self.key}: "
        text += self.message.rstrip(".") + "."
        if self.hint:
            hint = self.hint.rstrip(".")
            text += f" Fix: {hint}" + ("" if hint.endswith("?") else ".")
        return text

    def __str__(self) -> str:
        return self.render()


class ModelNotFoundError(HarnessError):
    """The weights for a model cannot be had on this machine."""


class ModelLoadError(HarnessError):
    """A model variant was found but failed to load (OOM, bad adapter, unsafe files)."""


class AdapterError(ModelLoadError):
    """A LoRA adapter that does not fit the base model or did not load."""


class NotJudged(HarnessError):
    """A check that could not be judged here although it should be (not a platform limit).

    The item is reported as skipped, tagged so that the session can tell it apart
    from a skip a platform is entitled to: in a gate run (``CI`` set) any
    not-judged item makes the session fail, outside CI it is listed loudly.
    """


NOT_JUDGED_PROPERTY = "harness_not_judged"


class GoldenError(HarnessError):
    """A golden file that is missing, unreadable or may not be written."""


class CheckFailure(AssertionError):
    """A check observed behaviour that differs from its golden file or budget.

    Subclassing AssertionError makes pytest report it as a failure (not an
    error) and show only our message, since ``harness`` frames are hidden.
    """
