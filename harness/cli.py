"""What ``harness-diff``, ``harness-calibrate`` and ``harness-bench`` share: their exit codes, the checks
of every argument before a model loads, and one paragraph (never a traceback) for what goes wrong.

Exit codes, the same for the three tools:

- 0: done;
- 1: done, and the tool's finding is negative (``harness-diff``: the models differ;
  ``harness-calibrate``: a variant's noise is beyond what a suite accepts, so no tolerance
  is recommended for it; ``harness-bench``: a variant failed to load, the report is incomplete);
- 2: nothing could be done: a usage error (found before any model loads), a model or
  adapter that cannot be used, an output that cannot be written;
- 3: an unexpected error inside the harness (a bug, or an input it does not validate yet),
  named in one paragraph; ``HARNESS_TRACEBACK=1`` prints the traceback as well;
- 130: interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from harness.errors import HarnessError
from harness.report.outputs import output_in_golden_problem

EXIT_OK = 0
EXIT_FINDING = 1
EXIT_UNUSABLE = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130


class ToolUsageError(HarnessError):
    """An argument that cannot work, found before any work started."""


class ToolParser(argparse.ArgumentParser):
    """argparse, with a usage error in one paragraph (not the whole usage block) and exit 2."""

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        self.exit(EXIT_UNUSABLE, f"{self.prog}: {message.rstrip('.')}. Nothing was run. Fix: see {self.prog} --help.\n")


def progress(prog: str) -> Callable[[str], None]:
    """The tool's progress printer: one line on stderr, named by the tool, so a long run is readable
    and stdout (or the report file) stays the tool's output alone."""

    def say(line: str) -> None:
        print(f"{prog}: {line}", file=sys.stderr, flush=True)

    return say


def run_tool(prog: str, body: Callable[[], int]) -> int:
    """Run a tool's body; whatever escapes it becomes one paragraph on stderr and an exit code."""
    try:
        return body()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; outputs may be incomplete.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ToolUsageError as exc:
        text = _paragraph(exc)
        print(f"{prog}: {text}" + ("" if "Nothing was run" in text else " Nothing was run."), file=sys.stderr)
        return EXIT_UNUSABLE
    except (HarnessError, ValueError) as exc:
        print(f"{prog}: {_paragraph(exc)}", file=sys.stderr)
        return EXIT_UNUSABLE
    except OSError as exc:
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        print(f"{prog}: {exc.strerror or exc}{where}. Fix: check that path (free space, permissions), then run "
              "again.", file=sys.stderr)
        return EXIT_UNUSABLE
    except Exception as exc:  # noqa: BLE001 - the last line of defence: a paragraph, not a traceback
        if os.environ.get("HARNESS_TRACEBACK"):
            import traceback

            traceback.print_exc()
        print(f"{prog}: unexpected {type(exc).__name__}: {_paragraph(exc)} (a harness bug, or an input it does "
              "not validate yet; set HARNESS_TRACEBACK=1 to print the traceback, and report it).", file=sys.stderr)
        return EXIT_INTERNAL


def _paragraph(exc: BaseException) -> str:
    """An exception's message on one paragraph (pydantic and library errors span several lines)."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return text or type(exc).__name__


# -- argument types: argparse reports a bad value as a usage error (exit 2) before anything runs ----
def whole_number(*, minimum: int, what: str = "") -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}{f' ({what})' if what else ''}")
        return value

    return parse


def finite_number(*, minimum: float, maximum: float, what: str = "") -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(f"{text} is outside {minimum:g}..{maximum:g}{f' ({what})' if what else ''}")
        return value

    return parse


def some_text(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty prompt gives the model nothing to continue; write some text")
    return text


def golden_dir_argument(parser: argparse.ArgumentParser, *, default: str = "golden/ next to --registry") -> None:
    parser.add_argument("--golden-dir", default=None, metavar="DIR",
                        help=f"the golden folder that outputs are kept out of (default: {default})")


def check_out_folder(flag: str, value: str | Path, *, golden_dirs: Sequence[Path], writes: Sequence[str]) -> Path:
    """``value`` as an output folder the tool can create and fill, or a ToolUsageError now, not after the work."""
    out = Path(value).expanduser()
    for golden in golden_dirs:  # first: a golden is never named as anything else
        problem = output_in_golden_problem(flag, value, golden)
        if problem:
            raise ToolUsageError(problem)
    if out.exists() and not out.is_dir():
        raise ToolUsageError(
            f"{flag} {value}: this is a file, and {flag} names a folder (the tool writes {', '.join(writes) or 'files'} "
            "in it). Nothing was run. Fix: pass a folder name (it is created), or move the file away."
        )
    existing = next((p for p in (out, *out.absolute().parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ToolUsageError(f"{flag} {value}: {existing} is a file, not a folder. Nothing was run. Fix: pass a path "
                             "in a folder.")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise ToolUsageError(f"{flag} {value}: {existing} is not writable for this user. Nothing was run. Fix: pass a "
                             "writable folder.")
    for name in writes:
        if (out / name).is_dir():
            raise ToolUsageError(f"{flag} {value}: {out / name} is a folder where the tool writes its file {name}. "
                                 "Nothing was run. Fix: move it away, or pass another folder.")
    return out


def golden_dirs(golden_dir: str | None, registry: str | Path) -> list[Path]:
    """The golden folder outputs are kept out of: the one given, else ``golden/`` next to the registry."""
    return [Path(golden_dir).expanduser()] if golden_dir else [Path(registry).expanduser().absolute().parent / "golden"]


def check_registry(value: str | Path, *, required: bool) -> Path:
    """The registry file; a folder, or a missing file the tool needs, is a usage error."""
    path = Path(value).expanduser()
    if path.is_dir():
        raise ToolUsageError(f"--registry {value}: this is a folder; the registry is one YAML file. Fix: pass the "
                             "file, e.g. --registry models.yaml.")
    if required and not path.is_file():
        raise ToolUsageError(f"--registry {value}: no such file. Fix: run from the project folder (where models.yaml "
                             "is) or pass --registry FILE.")
    return path


def check_adapter(flag: str, value: str | None) -> None:
    """An adapter folder, checked without loading anything (see ``harness.models.adapters.adapter_config``)."""
    if value is None:
        return
    from harness.models.adapters import adapter_config

    try:
        adapter_config(Path(value).expanduser())
    except HarnessError as exc:
        raise ToolUsageError(f"{flag} {value}: " + str(exc).removeprefix(f"Adapter {Path(value).expanduser()}: ")) \
            from None


def check_variants(value: str | None) -> None:
    """Known variant names only; whether an adapter exists for -lora ones is known after the registry."""
    if value is None:
        return
    from harness.models.variants import ALL_KEYS

    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        raise ToolUsageError(f"--variants {value!r} selects no variant. Fix: list at least one of {','.join(ALL_KEYS)}.")
    bad = [v for v in names if v not in ALL_KEYS]
    if bad:
        raise ToolUsageError(f"--variants: unknown variant {bad[0]!r}. Fix: choose from {','.join(ALL_KEYS)}.")


def check_attn(flag: str, value: str | None) -> None:
    if value is None:
        return
    from harness.models.registry import check_attn_implementation

    try:
        check_attn_implementation(value)
    except ValueError as exc:
        raise ToolUsageError(f"{flag}: {exc}.") from None
