"""Regenerate the examples in docs/ and README.md from real runs of the current code, and the suite
reference (docs/suites.md, harness/suites/suite.schema.json) from its spec classes.

    python docs/generate.py                          # every part (several minutes on a CPU)
    python docs/generate.py --only failure-example   # one part; repeat --only for more
    python docs/generate.py --list                   # the parts and what each writes

Each part runs the harness as a user does (``pytest``, ``harness-diff``) on the registry's
default model (the embedded one: offline, CPU is enough) with this checkout's ``harness``
first on ``PYTHONPATH``, and writes what the run printed either into a file under docs/ or
between marker comments of a Markdown file, so the prose around an example stays hand-written:

    <!-- generated: failure-example (python docs/generate.py --only failure-example) -->
    ...
    <!-- end generated -->

An example is the code's own output, not a paraphrase: when the code changes, rerun the part.
Paths are those the harness shows (relative to the run's rootdir); what lies outside it is
rewritten here as a reader's machine would have it (the home folder as ``~``, the run's
temporary folder dropped), and a part refuses to write output that still names a path of this
machine. Rewriting a marker block with the same text changes nothing; figures and timings of a
run (the green report's wall time, memory, speeds) are those of the machine that ran it, and the
green report says so.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # this checkout's harness, not an installed one

from harness.report.display import relative_paths  # noqa: E402

END_MARKER = "<!-- end generated -->"
# absolute paths that belong to one machine, whoever made the example (a last guard)
MACHINE_PATH = re.compile(r"(?<![\w.~/\\-])(/(home|root|tmp|Users|private|var|mnt|opt|srv|work)/|[A-Z]:\\)")
# the constructed regression of the failure example and the model diff (harness.calibrate.regressions):
# Gaussian noise of 5 % of each weight matrix's std on the middle decoder layer
REGRESSION = "weights:0.05"
FAILURE_CHECK, FAILURE_VARIANT = "capital-raw", "fp16"


class GenerationError(Exception):
    """A part could not produce its example; the message says which and why."""


# ---------------------------------------------------------------------------- plumbing


def start_marker(name: str) -> str:
    return f"<!-- generated: {name} (python docs/generate.py --only {name}) -->"


def replace_blocks(text: str, name: str, body: str, *, source: str) -> str:
    """``text`` with every ``name`` block's content replaced by ``body``, indented like its marker
    (a block inside a list item keeps the item's indentation). A file without the marker, or a
    marker without its end, is an error: a silently skipped example would go stale."""
    start = re.compile(rf"^(?P<indent>[ \t]*)<!-- generated: {re.escape(name)}[ (].*-->[ \t]*$", re.M)
    end = re.compile(rf"^[ \t]*{re.escape(END_MARKER)}[ \t]*$", re.M)
    matches = list(start.finditer(text))
    if not matches:
        raise GenerationError(f"{source}: no '<!-- generated: {name} ... -->' marker; add one (and "
                              f"'{END_MARKER}') where the example goes.")
    out: list[str] = []
    pos = 0
    for match in matches:
        closing = end.search(text, match.end())
        following = start.search(text, match.end())
        if closing is None or (following is not None and following.start() < closing.start()):
            line = text.count("\n", 0, match.start()) + 1
            raise GenerationError(f"{source}:{line}: the '{name}' block has no '{END_MARKER}' line.")
        indent = match["indent"]
        block = "".join(f"{indent}{line}\n" if line.strip() else "\n" for line in body.splitlines())
        out.append(text[pos:match.start()] + indent + start_marker(name) + "\n" + block)
        pos = closing.start()
    return "".join(out) + text[pos:]


def update_file(path: Path, name: str, body: str) -> bool:
    """Rewrite the ``name`` blocks of ``path``; True when its text changed."""
    text = path.read_text(encoding="utf-8")
    new = replace_blocks(text, name, body, source=str(path))
    if new != text:
        path.write_text(new, encoding="utf-8")
    return new != text


def machine_free(text: str, *, roots: list[Path], what: str) -> str:
    """``text`` as a reader's machine would show it: paths inside ``roots`` relative to them,
    the home folder as ``~``; an error if a path of this machine is still in it."""
    for root in roots:
        text = relative_paths(text, root)
    home = str(Path.home())
    if Path(home).parent != Path(home):
        text = re.sub(r"(?<![\w.~/\\-])" + re.escape(home) + r"(?=[/\\])", "~", text)
    from harness.models.sources import cache_dir

    cache = str(cache_dir())
    text = text.replace(cache, "$HARNESS_CACHE")  # a cache outside the home folder (HARNESS_CACHE set)
    left = first_machine_path(text, [*map(str, roots), *(str(r.resolve()) for r in roots), home, tempfile.gettempdir()])
    if left:
        raise GenerationError(
            f"{what}: the output still names a path of this machine ({left}...). The harness shows paths "
            "inside the rootdir relative to it and others as given: build the example inside the run's folder, "
            "or fix the code that prints an absolute path where a relative one would do.")
    return text


def first_machine_path(text: str, prefixes: list[str]) -> str | None:
    for prefix in (p for p in prefixes if len(p) > 1):
        found = re.search(re.escape(prefix) + r"(?=[/\\\s`'\"]|$)", text)
        if found:
            return found.group(0)
    found = MACHINE_PATH.search(text)
    return found.group(0) if found else None


def fenced(text: str) -> str:
    return "```text\n" + text.strip("\n") + "\n```\n"


def harness_env() -> dict[str, str]:
    """A developer's run: this checkout's harness first, ``CI`` unset (a gate refuses
    --snapshot-update, which the failure example records its goldens with)."""
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def run(argv: list[str], *, cwd: Path, expect: tuple[int, ...], what: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, cwd=cwd, env=harness_env(), text=True, capture_output=True, check=False)
    if proc.returncode not in expect:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
        raise GenerationError(f"{what}: `{' '.join(argv)}` exited {proc.returncode} (expected "
                              f"{' or '.join(map(str, expect))}); its output ends with:\n{tail}")
    return proc


def pytest_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args]


def default_model() -> tuple[str, Path, dict[str, object]]:
    """The registry's default model: its name, its local folder, its registry settings."""
    from harness.models.registry import load_registry
    from harness.models.sources import resolve

    registry = load_registry(REPO / "models.yaml")
    resolved = resolve(None, registry=registry, rootdir=REPO)
    settings = resolved.entry.model_dump(exclude_defaults=True, exclude={
        "hub", "revision", "gguf", "embedded", "path", "local", "adapter", "description"})
    return resolved.name, resolved.path, settings


def link_folder(src: Path, dst: Path) -> Path:
    """A folder of links to ``src``'s files: the same model under another path, nothing copied."""
    dst.mkdir(parents=True)
    for file in src.iterdir():
        if file.is_file():
            (dst / file.name).symlink_to(file.resolve())
    return dst


def regressed_copy(model: Path, workdir: Path) -> Path:
    from harness.calibrate.regressions import apply, parse

    (regression,) = parse(REGRESSION)
    folder, _ = apply(regression, model=model, adapter=None, workdir=workdir)
    return folder


# ---------------------------------------------------------------------------- parts


@dataclass
class Context:
    docs_root: Path  # where README.md and docs/ are written
    workdir: Path
    max_new_tokens: int | None = None


def green_report(ctx: Context) -> list[Path]:
    """docs/example-report-green.md: the default run, ``pytest suites/ --harness-report``."""
    report = ctx.workdir / "report.md"
    run(pytest_argv("suites/", "--harness-report", str(report)), cwd=REPO, expect=(0,),
        what="green-report (the default run must be green)")
    target = ctx.docs_root / "docs" / "example-report-green.md"
    target.write_text(green_text(report.read_text(encoding="utf-8")), encoding="utf-8")
    return [target]


def green_text(report: str) -> str:
    """The report as committed: no machine path, and its wall time marked as one machine's."""
    text = machine_free(report, roots=[REPO], what="green-report")
    text, found = re.subn(r"^(- \*\*result: green\*\* \(.*\) in \d+ s)$",
                          r"\1 (wall time on the machine that generated this example)", text, count=1, flags=re.M)
    if not found:
        raise GenerationError("green-report: no '- **result: green** (...) in N s' line in the report; the "
                              "report's layout changed: update docs/generate.py.")
    return ("<!-- generated (python docs/generate.py --only green-report): `pytest suites/ --harness-report` "
            "on the default model; do not edit -->\n" + text)


def failure_example(ctx: Context) -> list[Path]:
    """README's and docs/gate.md's failure: goldens recorded with the default model, then the
    same check run on a copy with a constructed regression (``REGRESSION``)."""
    name, model, settings = default_model()
    project = ctx.workdir / "project"
    (project / "suites").mkdir(parents=True)
    registry = {"default": name, "models": {name: {**settings, "path": "model"}}}
    (project / "models.yaml").write_text(json.dumps(registry, indent=2), encoding="utf-8")  # JSON is YAML
    suite = (REPO / "suites" / "generation.yaml").read_text(encoding="utf-8")
    if ctx.max_new_tokens is not None:  # line-preserving, so the failure's suite line stays right
        suite = re.sub(r"(max_new_tokens:\s*)\d+", rf"\g<1>{ctx.max_new_tokens}", suite)
    (project / "suites" / "generation.yaml").write_text(suite, encoding="utf-8")
    args = ("suites/generation.yaml", "-k", FAILURE_CHECK, "--variants", FAILURE_VARIANT, "--device", "cpu",
            f"--rootdir={project}")

    link_folder(model, project / "model")
    run(pytest_argv(*args, "--snapshot-update"), cwd=project, expect=(0,), what="failure-example (recording)")
    changed = regressed_copy(model, ctx.workdir / "regression")
    shutil.rmtree(project / "model")
    changed.rename(project / "model")
    run(pytest_argv(*args, "--junitxml", "junit.xml"), cwd=project, expect=(0, 1), what="failure-example")

    item = f"{FAILURE_CHECK}[{FAILURE_VARIANT}]"
    cases = {case.get("name"): case for case in ET.parse(project / "junit.xml").iter("testcase")}
    failure = cases[item].find("failure") if item in cases else None
    if failure is None:
        raise GenerationError(f"failure-example: {item} did not fail on the constructed regression "
                              f"({REGRESSION}); the example needs one the engine catches: change REGRESSION "
                              "in docs/generate.py.")
    text = machine_free(failure.text or "", roots=[project, ctx.workdir, REPO], what="failure-example")
    body = fenced(text)
    targets = [ctx.docs_root / "README.md", ctx.docs_root / "docs" / "gate.md"]
    for target in targets:
        update_file(target, "failure-example", body)
    return targets


def model_diff(ctx: Context) -> list[Path]:
    """docs/example-diff/: ``harness-diff`` on a constructed update (the regression, and
    sampling turned on in generation_config.json)."""
    name, model, _ = default_model()
    update = regressed_copy(model, ctx.workdir / "regression").rename(ctx.workdir / f"{name}-update")
    config = update / "generation_config.json"
    settings = json.loads(config.read_text(encoding="utf-8"))
    config.unlink()  # a link into the model cache: never write through it
    settings.update(do_sample=True, temperature=0.7, top_p=0.9)
    config.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    out = ctx.workdir / "diff-out"
    run([sys.executable, "-m", "harness.diff.cli", name, f"{name}-update", "--registry", str(REPO / "models.yaml"),
         "--suites", str(REPO / "suites" / "generation.yaml"), "--max-prompts", "3", "--device", "cpu", "--out", str(out)],
        cwd=ctx.workdir, expect=(1,), what="model-diff (the update must show as a change)")
    target = ctx.docs_root / "docs" / "example-diff"
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for file in sorted(out.iterdir()):
        if file.suffix in (".md", ".json"):
            text = machine_free(file.read_text(encoding="utf-8"), roots=[ctx.workdir, REPO], what=f"model-diff {file.name}")
            (target / file.name).write_text(text, encoding="utf-8")
        else:
            shutil.copyfile(file, target / file.name)
        written.append(target / file.name)
    return written


def suite_reference(ctx: Context) -> list[Path]:
    """docs/suites.md and harness/suites/suite.schema.json, from the spec classes (no model, no run)."""
    from harness.suites.reference import SCHEMA_PATH, reference_markdown, schema_text

    targets = {ctx.docs_root / "docs" / "suites.md": reference_markdown(),
               ctx.docs_root / SCHEMA_PATH.relative_to(REPO): schema_text()}
    for target, text in targets.items():
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
    return list(targets)


PARTS: dict[str, tuple[Callable[[Context], list[Path]], str]] = {
    "suite-reference": (suite_reference, "docs/suites.md and harness/suites/suite.schema.json: every kind and key, "
                                         "from the spec classes (seconds; no model)"),
    "failure-example": (failure_example, "README.md and docs/gate.md blocks: a greedy golden failing on a "
                                         f"constructed regression ({REGRESSION}, {FAILURE_CHECK}[{FAILURE_VARIANT}])"),
    "model-diff": (model_diff, "docs/example-diff/: harness-diff on a constructed update"),
    "green-report": (green_report, "docs/example-report-green.md: pytest suites/ --harness-report (the longest)"),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python docs/generate.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", action="append", choices=sorted(PARTS), metavar="NAME",
                   help=f"run only this part (repeatable): {', '.join(PARTS)}")
    p.add_argument("--list", action="store_true", help="list the parts and exit")
    p.add_argument("--docs-root", type=Path, default=REPO,
                   help="folder whose README.md and docs/ are updated (default: this repository; for tests)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="failure-example: shorten every greedy check to N tokens (for tests; the docs use the suite's)")
    args = p.parse_args(argv)
    if args.list:
        for name, (_, what) in PARTS.items():
            print(f"{name}: {what}")
        return 0
    for name in args.only or list(PARTS):
        fn, _ = PARTS[name]
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix=f"harness-docs-{name}-") as tmp:
            try:
                written = fn(Context(docs_root=args.docs_root.resolve(), workdir=Path(tmp),
                                     max_new_tokens=args.max_new_tokens))
            except GenerationError as exc:
                print(f"generate: {name}: {exc}", file=sys.stderr)
                return 1
        shown = ", ".join(str(relative_paths(str(w), args.docs_root.resolve())) for w in written)
        print(f"generate: {name}: wrote {shown} in {time.monotonic() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
