"""``--shard K/N``: one session's items split over N CI jobs, whole load groups at a time.

A load group is what one model load serves: every item of a variant (model x variant, as
``pytest -n N --dist loadgroup`` keeps them on one worker), the model-level items (tokenizer,
chat template: group ``tokenizer``), and any other test file on its own. Groups are dealt to
shards by an estimated cost (their item count), largest first, each to the least loaded shard,
ties to the lowest: every shard computes the same plan from the same collection, so the shards
together run each item exactly once and each loads each variant at most once.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TOKENIZER_GROUP = "tokenizer"
MAX_SHARDS = 1000  # more jobs than any CI matrix runs; the plan keeps a list of this length
_XDIST_SUFFIX = re.compile(r"@[^@\[\]/:]*$")  # `--dist loadgroup` appends "@group" to node ids


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (1-based, as CI matrices count)."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``K/N`` with 1 <= K <= N; anything else is a ValueError saying what to write."""
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not match:
            raise ValueError(f"--shard {text!r}: write K/N, e.g. --shard 2/3 for the second of three shards")
        index, count = _bounded(match[1]), _bounded(match[2])
        text = text if len(text) <= 40 else text[:37] + "..."
        if count > MAX_SHARDS:
            raise ValueError(f"--shard {text!r}: N may be at most {MAX_SHARDS} (one CI job per shard, and each "
                             f"loads its share of the models), e.g. --shard 1/{MAX_SHARDS}")
        if count < 1 or not 1 <= index <= count:
            raise ValueError(f"--shard {text!r}: K must be between 1 and N (N >= 1), e.g. --shard 1/{max(count, 1)}")
        return cls(index, count)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def _bounded(digits: str) -> int:
    """A whole number, or ``MAX_SHARDS + 1`` for one too long to be a shard (``int()`` refuses thousands of digits)."""
    return int(digits) if len(digits.lstrip("0")) <= len(str(MAX_SHARDS)) else MAX_SHARDS + 1


def plain_nodeid(nodeid: str) -> str:
    """A node id without the ``@group`` that ``--dist loadgroup`` appends (item names never contain '@')."""
    return _XDIST_SUFFIX.sub("", nodeid)


def load_group(item: Any) -> str:
    """The group an item belongs to: its variant's key, ``tokenizer`` for model-level harness items,
    else its file (an ordinary test loads whatever it loads once per file at most)."""
    from harness.run.items import HarnessItem, item_variant

    variant = item_variant(item)
    if variant is not None:
        return variant.key
    if isinstance(item, HarnessItem):
        return TOKENIZER_GROUP
    return "file:" + plain_nodeid(item.nodeid).split("::")[0]


def assign(costs: dict[str, int], count: int) -> dict[str, int]:
    """Groups dealt to ``count`` shards (1-based): largest first, each to the least loaded shard."""
    loads = [0] * count
    shards: dict[str, int] = {}
    for name, cost in sorted(costs.items(), key=lambda kv: (-kv[1], kv[0])):
        target = min(range(count), key=lambda i: (loads[i], i))
        shards[name] = target + 1
        loads[target] += cost
    return shards


def plan(items: list[Any], shard: Shard, *, rootdir: Path) -> tuple[list[Any], list[Any], dict[str, Any]]:
    """Split ``items`` for ``shard``: (kept, deselected, the plan the shard's result records).

    The plan names every group, its item count and its shard, and digests of what was
    collected, so that a merge can tell shards of different collections apart.
    """
    groups = [load_group(item) for item in items]
    costs = dict(Counter(groups))
    shards = assign(costs, shard.count)
    kept = [item for item, group in zip(items, groups) if shards[group] == shard.index]
    dropped = [item for item, group in zip(items, groups) if shards[group] != shard.index]
    record = {
        "collected": len(items),
        "collected_digest": digest(sorted(plain_nodeid(item.nodeid) for item in items)),
        "suites": files_digest({Path(item.path) for item in items}, rootdir=rootdir),
        "groups": {name: {"items": costs[name], "shard": shards[name]} for name in sorted(costs)},
        "selected": [plain_nodeid(item.nodeid) for item in kept],
    }
    return kept, dropped, record


def digest(lines: Iterable[str]) -> str:
    """A short, stable hash of some lines of text."""
    sha = hashlib.sha256()
    for line in lines:
        sha.update(line.encode("utf-8", "surrogatepass") + b"\n")
    return sha.hexdigest()[:16]


def files_digest(files: Iterable[Path], *, rootdir: Path) -> str:
    """A hash of files' names (relative to ``rootdir``) and contents: the same on every checkout."""
    lines = []
    for file in sorted(files):
        try:
            name = file.resolve().relative_to(rootdir.resolve()).as_posix()
        except ValueError:
            name = file.as_posix()
        try:
            content = hashlib.sha256(file.read_bytes()).hexdigest()
        except OSError as exc:
            content = f"unreadable ({type(exc).__name__})"
        lines.append(f"{name} {content}")
    return digest(lines)


def tree_digest(root: Path) -> str | None:
    """A hash of every file under ``root`` (the golden tree); None when there is no such folder."""
    if not root.is_dir():
        return None
    return files_digest((p for p in root.rglob("*") if p.is_file()), rootdir=root)
