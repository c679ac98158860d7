"""The prompts a model diff runs: the greedy and drift prompts of the suites given."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.observe.prompts import Message, encode_prompt


@dataclass(frozen=True)
class SuitePrompt:
    """One prompt as a suite writes it; ``id`` is ``suite/check`` (``#n`` for a drift check's n-th)."""

    id: str
    prompt: str | None = None
    messages: tuple[Message, ...] | None = None

    def encode(self, tokenizer: Any) -> list[int]:
        return encode_prompt(tokenizer, prompt=self.prompt,
                             messages=list(self.messages) if self.messages is not None else None)


def suite_files(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if not path.exists():
            raise ValueError(f"--suites {path}: no such file or folder. Fix: name suite files or folders "
                             "(default: suites/), or pass --suites with nothing after it for files and weights only.")
        files.extend(sorted(path.glob("*.yaml")) + sorted(path.glob("*.yml")) if path.is_dir() else [path])
    return files


def suite_prompts(paths: list[Path]) -> list[SuitePrompt]:
    """Greedy checks' prompts, then drift checks' prompts and chats, in file order."""
    from harness.suites.spec import load_suite

    found: list[SuitePrompt] = []
    for file in suite_files(paths):
        suite = load_suite(file)
        for entry in suite.checks:
            spec: Any = entry.check.spec
            where = f"{suite.name}/{spec.id}"
            if spec.kind == "greedy":
                found.append(SuitePrompt(where, spec.prompt, tuple(spec.messages) if spec.messages else None))
            elif spec.kind == "drift":
                items: list[SuitePrompt] = [SuitePrompt(f"{where}#{i}", p) for i, p in enumerate(spec.prompts)]
                items += [SuitePrompt(f"{where}#{len(spec.prompts) + i}", None, tuple(chat))
                          for i, chat in enumerate(spec.chats)]
                found.extend(items)
    return found
