"""README and the docs pages name what the command lines accept: no model loads, only `--help`.

A user reads README's options table and each tool's page instead of `--help`; an option added to
the code but not to the page, or a row for an option that no longer exists, is a guide that lies.
The options come from the parsers themselves (`--help` in a subprocess, as a user sees them), so
the tests cannot drift from the code.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
MAX_README_LINES = 300


# Each console script, the module it runs, the arguments that print its options, and where
# its options are documented (a docs page, or README's section of that title).
TOOLS = {
    "harness-diff": ("harness.diff.cli", [], "docs/reference.md"),
    "harness-calibrate": ("harness.calibrate.run", [], "docs/calibration.md"),
    "harness-bench": ("harness.bench.run", [], "docs/benchmark.md"),
    "harness-report": ("harness.report.merge", ["merge"], "docs/gate.md"),
    "harness-validate": ("harness.suites.validate", [], "README.md#Writing a suite"),
}

OPTION_LINE = re.compile(r"^ {2}(--[a-z][\w-]*)", re.M)


def _help(*args: str) -> str:
    """``--help`` of a module run as the user runs it, with this checkout first on the path."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, *args, "--help"], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _section(text: str, title: str) -> str:
    """README's ``## title`` section, up to the next section of the same level."""
    match = re.search(rf"^## {re.escape(title)}.*?(?=^## |\Z)", text, re.M | re.S)
    assert match, f"README.md has no section '## {title}'"
    return match.group(0)


def _named(option: str, text: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text) is not None


def _pytest_help() -> str:
    return _help("-m", "pytest", "-p", "no:cacheprovider")


def _harness_group_options(help_text: str) -> set[str]:
    """The options listed under the plugin's group in ``pytest --help``."""
    group = help_text.split("(harness):\n", 1)[1].split("\n\n", 1)[0]
    return set(OPTION_LINE.findall(group))


def _table_rows(readme: str) -> list[str]:
    """The option each row of README's options table documents (its first cell's first option)."""
    section = _section(readme, "Options")
    rows = []
    for line in section.splitlines():
        if line.startswith("| `--"):
            rows.append(re.match(r"\| `(--[\w-]+)", line).group(1))
    return rows


def test_readme_is_a_guide_not_a_notebook():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; move rationale and measurements to docs/"


def test_readme_quotes_no_measurement_by_hand():
    """Measured figures live in docs/ beside how they were made; README's only ones are generated."""
    text = README.read_text(encoding="utf-8")
    text = re.sub(r"<!-- generated: .*?<!-- end generated -->", "", text, flags=re.S)
    text = re.sub(r"==\d+(\.\d+)+", "", text)  # pinned versions
    figures = re.findall(r"\b\d+\.\d+\b|\b\d+ (?:s|ms|MiB|GiB|%)(?![\w-])", text)
    assert not figures, f"README.md quotes measured figures outside a generated block: {figures}"


def test_every_harness_option_has_exactly_one_row_in_readmes_table():
    help_text = _pytest_help()
    group = _harness_group_options(help_text)
    assert "--model" in group and "--shard" in group, group
    rows = _table_rows(README.read_text(encoding="utf-8"))
    twice = sorted({row for row in rows if rows.count(row) > 1})
    assert not twice, f"README's options table has more than one row for {twice}"
    missing = sorted(group - set(rows))
    assert not missing, f"options of the harness group without a row in README's options table: {missing}"
    known = set(re.findall(r"^\s+(--[a-z][\w-]*)", help_text, re.M))
    unknown = sorted(set(rows) - known)
    assert not unknown, f"README's options table has rows for options pytest does not have: {unknown}"


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_every_option_of_a_tool_is_named_on_its_page(tool):
    module, args, page = TOOLS[tool]
    options = set(OPTION_LINE.findall(_help("-m", module, *args))) - {"--help"}
    assert options, f"{tool} --help lists no options"
    path, _, title = page.partition("#")
    text = (REPO / path).read_text(encoding="utf-8")
    if title:
        text = _section(text, title)
    missing = sorted(option for option in options if not _named(option, text))
    assert not missing, f"{tool}: options not named in {page}: {missing}"


def test_readmes_set_up_commands_are_the_ones_ci_runs():
    """``.ci/run`` reads the two commands from README; a rewrite of README must keep them readable."""
    script = "source <(sed -n '/^readme_command()/,/^}/p' .ci/run); readme_command main; readme_command dev"
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=REPO, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    main, dev = proc.stdout.splitlines()
    assert main.endswith("&& python -m pytest suites/") and "[dev]" not in main
    assert dev.endswith("&& python -m pytest tests/ -n 2") and '".[dev]"' in dev
