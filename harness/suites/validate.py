"""``harness-validate``: check suite files without loading a model.

    harness-validate suites/ my-suite.yaml

Each file goes through the loader pytest collects with (``harness.suites.spec.load_suite``), so a
suite this command accepts is one a run accepts, and each problem is the same one-paragraph
error naming the file, the line, the key and the fix. Folders are searched for ``*.yaml`` and
``*.yml``, as pytest does for a folder named on its command line; two suites of one run may not
share a name (they would share a golden folder), so that is checked across the files given.

Exit codes, as the other tools (``harness.cli``): 0 every suite is valid; 2 a suite is not, or a
path names no suite; 3 an unexpected error inside the harness; 130 interrupted.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from harness.cli import EXIT_OK, EXIT_UNUSABLE, ToolParser, ToolUsageError, run_tool
from harness.errors import SuiteError

PROG = "harness-validate"
SUFFIXES = (".yaml", ".yml")


def main(argv: Sequence[str] | None = None) -> int:
    parser = ToolParser(prog=PROG, description="Check YAML suites without loading a model: exit 0 when every "
                        "suite is valid, 2 when one is not (each problem in one paragraph on stderr).")
    parser.add_argument("paths", nargs="*", metavar="PATH",
                        help="suite files, or folders searched for *.yaml and *.yml (default: suites/)")
    parser.add_argument("--schema-path", action="store_true",
                        help="print the path of the JSON schema for suite files shipped with the harness (for an "
                             "editor's `# yaml-language-server: $schema=PATH` line) and exit")
    args = parser.parse_args(argv)
    if args.schema_path:
        from harness.suites.reference import SCHEMA_PATH

        print(SCHEMA_PATH)
        return EXIT_OK
    return run_tool(PROG, lambda: validate_paths([Path(p) for p in args.paths or ["suites"]]))


def validate_paths(paths: list[Path]) -> int:
    """Load every suite under ``paths``; print each problem, then a one-line count."""
    from harness.golden.layout import SuiteNames
    from harness.suites.spec import load_suite

    files = suite_files(paths)
    names = SuiteNames()
    problems = 0
    for path in files:
        try:
            suite = load_suite(path)
            names.claim(suite.name, path)
        except SuiteError as err:
            print(err.render(), file=sys.stderr)
            problems += 1
    valid = len(files) - problems
    print(f"{PROG}: {valid} of {len(files)} suite{'s' if len(files) != 1 else ''} valid"
          + (f", {problems} with a problem (above)" if problems else ""))
    return EXIT_UNUSABLE if problems else EXIT_OK


def suite_files(paths: list[Path]) -> list[Path]:
    """The suite files named, folders expanded (sorted, each file once); a path with none is a usage error."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file())
            if not inside:
                raise ToolUsageError(f"{path}: no *.yaml or *.yml file in this folder. Fix: name a folder of "
                                     "suites, or the suite files.")
            found += inside
        elif path.is_file():
            if path.suffix not in SUFFIXES:
                raise ToolUsageError(f"{path}: not a YAML file (.yaml or .yml). Fix: name suite files or folders.")
            found.append(path)
        else:
            raise ToolUsageError(f"{path}: no such file or folder. Fix: check the path.")
    unique: dict[Path, Path] = {}
    for path in found:
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


if __name__ == "__main__":
    sys.exit(main())
