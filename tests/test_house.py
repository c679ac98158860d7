"""The house rules that keep the package easy to change: no import circles, one rule for golden names.

Pure logic (no model is loaded), except one collection-only run of pytest on bad suites.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from harness.errors import SuiteError
from harness.suites.names import check_id_problem, golden_folder_name, name_problem
from harness.suites.spec import load_suite
from harness.models.variants import ALL_KEYS

PACKAGE = Path(__file__).resolve().parents[1] / "harness"

Edge = tuple[str, str, int]  # (imported module, importing file, line)


# -- no import circles ----------------------------------------------------------------------------
def harness_modules(package: Path = PACKAGE) -> dict[str, Path]:
    """Every module under ``harness/`` by dotted name (a package by its ``__init__``)."""
    modules = {}
    for file in sorted(package.rglob("*.py")):
        parts = list(file.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = file
    return modules


def _import_nodes(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, at module level, inside functions and classes, and inside
    ``if TYPE_CHECKING:``: a design circle hidden behind TYPE_CHECKING is still a circle."""
    found = [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]
    return sorted(found, key=lambda node: (node.lineno, node.col_offset))


def imports_of(name: str, modules: dict[str, Path], *, package_dir: Path = PACKAGE) -> list[Edge]:
    """The harness modules that ``name`` imports, with the line of each import.

    ``import a.b`` and ``from a import b`` (``b`` a submodule) count as importing ``a.b``;
    ``from a import x`` (``x`` a name, not a module) counts as importing ``a`` itself, that is
    a package's ``__init__``. Parent packages that Python initializes on the way to a submodule
    are not counted: a package's ``__init__`` that imports its own submodules (``harness.checks``
    imports every kind to register it) would otherwise form a "circle" with each of them,
    although Python always finishes the package first. A module that asks the package itself
    for a name (``from harness.checks import get_check``) does get an edge to the ``__init__``,
    and through it to every kind: that is a real circle if one of them is the asker.
    """
    file = modules[name]
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    edges: list[Edge] = []
    for node in _import_nodes(ast.parse(file.read_text(encoding="utf-8"), str(file))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                       for alias in node.names]
        edges += [(target, file.relative_to(package_dir.parent).as_posix(), node.lineno)
                  for target in targets if target in modules and target != name]
    return edges


def find_cycle(graph: dict[str, list[Edge]]) -> list[tuple[str, Edge]] | None:
    """One import circle as (module, edge to the next) steps, or None (depth-first, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[tuple[str, Edge]] = []

    def visit(module: str) -> list[tuple[str, Edge]] | None:
        state[module] = 1
        for edge in graph[module]:
            target = edge[0]
            path.append((module, edge))
            if state.get(target) == 1:
                start = next(i for i, (m, _) in enumerate(path) if m == target)
                return path[start:]
            if target not in state:
                found = visit(target)
                if found:
                    return found
            path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state:
            found = visit(module)
            if found:
                return found
    return None


def describe_cycle(cycle: list[tuple[str, Edge]]) -> str:
    return "\n".join(f"  {module} -> {target}   ({file}:{line})" for module, (target, file, line) in cycle)


def test_the_harness_package_has_no_import_circle():
    modules = harness_modules()
    graph = {name: imports_of(name, modules) for name in modules}
    cycle = find_cycle(graph)
    assert cycle is None, (
        "import circle (function-level and `if TYPE_CHECKING:` imports count):\n" + describe_cycle(cycle)
        + "\nMove what both sides need into a module below both (as harness.suites.names is for golden names).")


def test_the_circle_finder_sees_function_level_imports_and_names_the_lines(tmp_path):
    """The checker itself: a circle closed by an import inside a function is found, and TYPE_CHECKING
    imports count (here both branches import the same module)."""
    package = tmp_path / "harness"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from harness.b import x\n")
    (package / "b.py").write_text("x = 1\ndef f():\n    from harness.sub import c\n")
    (package / "sub" / "__init__.py").write_text("from harness.sub import c\n")
    (package / "sub" / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                           "    from harness.sub import d\nelse:\n    from . import d\n")
    (package / "sub" / "d.py").write_text("def g():\n    from ..a import y\n")
    modules = harness_modules(package)
    graph = {name: imports_of(name, modules, package_dir=package) for name in modules}
    cycle = find_cycle(graph)
    assert cycle is not None
    text = describe_cycle(cycle)
    assert [m for m, _ in cycle] == ["harness.a", "harness.b", "harness.sub.c", "harness.sub.d"], text
    assert "harness/b.py:3" in text and "harness/sub/d.py:2" in text
    assert ("harness.sub.d", "harness/sub/c.py", 3) in graph["harness.sub.c"]  # TYPE_CHECKING counts


def test_a_circle_behind_type_checking_is_still_a_circle(tmp_path):
    package = tmp_path / "harness"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from harness.b import B\n")
    (package / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from harness.a import A\n")
    modules = harness_modules(package)
    cycle = find_cycle({name: imports_of(name, modules, package_dir=package) for name in modules})
    assert cycle is not None and {m for m, _ in cycle} == {"harness.a", "harness.b"}
    assert "harness/b.py:3" in describe_cycle(cycle)


# -- layers point one way ----------------------------------------------------------------------------
# Console tools: their own packages, the entry modules that live beside the layer they serve, and the
# plumbing only tools use. A tool may import any shared layer; no shared layer imports a tool.
TOOL_PACKAGES = ("harness.bench", "harness.calibrate", "harness.diff", "harness.upstream")
TOOL_MODULES = ("harness.report.merge", "harness.suites.validate", "harness.cli")
SHARED = ("errors", "suites", "models", "observe", "judge", "golden", "measure", "checks", "run", "report", "plugin")

# Which shared layer may import which (derived from the code, then held): each row lists what its
# modules may import. ``checks`` below ``run``/``report`` means only ``harness.checks`` (the registry)
# and ``harness.checks.base``; a kind (``harness.checks.greedy``...) is imported by nothing outside it.
MAY_IMPORT: dict[str, set[str]] = {
    "errors": set(),
    "suites": {"errors", "models", "judge", "checks"},  # a suite's spec: variant keys, tolerances, the kinds
    "models": {"errors", "suites"},  # the registry reads YAML and names with the suites' rules
    "observe": {"errors", "models"},
    "judge": {"errors", "models", "observe", "golden"},  # a golden is judged as the format reads it
    "golden": {"errors", "models", "suites", "observe"},  # the greedy golden format is an observation's trace
    "measure": {"errors", "models", "observe"},
    "checks": {"errors", "suites", "models", "observe", "judge", "golden", "measure"},
    "run": {"errors", "suites", "models", "observe", "judge", "golden", "measure", "checks", "report"},
    "report": {"errors", "suites", "models", "observe", "judge", "golden", "measure", "checks", "run"},
    "plugin": {"errors", "suites", "models", "observe", "judge", "golden", "measure", "checks", "run", "report"},
}
CHECKS_FOR_THE_RUN = ("harness.checks", "harness.checks.base")



def layer_of(module: str) -> str:
    """``tool`` for a console tool's module, else the top-level package (``errors``, ``plugin``: the file)."""
    if module in TOOL_MODULES or module.startswith(tuple(p + "." for p in TOOL_PACKAGES)) or module in TOOL_PACKAGES:
        return "tool"
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "harness"


def layering_breaks(graph: dict[str, list[Edge]]) -> dict[tuple[str, str], str]:
    """Every (importer, imported) that the table, the kinds rule or the tools rule forbids, with the line."""
    found: dict[tuple[str, str], str] = {}
    for module, edges in graph.items():
        mine = layer_of(module)
        for target, file, line in edges:
            theirs = layer_of(target)
            if mine == theirs and (mine != "tool" or target.split(".")[:2] == module.split(".")[:2]
                                   or target == "harness.cli"):
                continue  # within a layer; a tool with its own package or the tools' plumbing
            kind = theirs == "checks" and target not in CHECKS_FOR_THE_RUN and mine != "checks"
            if mine == "tool":
                bad = kind or theirs == "tool"
            elif mine == "harness":
                bad = False
            else:
                bad = kind or theirs == "tool" or theirs not in MAY_IMPORT.get(mine, set())
            if bad:
                found.setdefault((module, target), f"{file}:{line}")
    return found


def test_layers_point_one_way():
    """No shared layer imports a tool or a check kind, and each imports only what its row allows."""
    modules = harness_modules()
    assert set(MAY_IMPORT) | {"harness", "tool"} >= {layer_of(m) for m in modules}, "a new package needs a row"
    graph = {name: imports_of(name, modules) for name in modules}
    new = {edge: where for edge, where in layering_breaks(graph).items()}
    assert not new, "imports against the layering (tests/test_house.py: MAY_IMPORT):\n" + "\n".join(
        f"  {a} ({layer_of(a)}) -> {b} ({layer_of(b)})   {where}" for (a, b), where in sorted(new.items()))


def test_the_layering_check_sees_a_shared_layer_importing_a_kind_or_a_tool(tmp_path):
    package = tmp_path / "harness"
    for folder in ("judge", "checks", "diff"):
        (package / folder).mkdir(parents=True)
        (package / folder / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "checks" / "base.py").write_text("")
    (package / "checks" / "greedy.py").write_text("")
    (package / "diff" / "run.py").write_text("from harness.checks import base\n")
    (package / "judge" / "a.py").write_text("def f():\n    from harness.checks import greedy\n"
                                              "    from harness.diff import run\n")
    modules = harness_modules(package)
    found = layering_breaks({name: imports_of(name, modules, package_dir=package) for name in modules})
    assert found == {("harness.judge.a", "harness.checks.greedy"): "harness/judge/a.py:2",
                     ("harness.judge.a", "harness.diff.run"): "harness/judge/a.py:3"}


# -- no module over 400 lines without a reason --------------------------------------------------------
MAX_LINES = 400


def long_modules(package: Path = PACKAGE) -> dict[str, int]:
    """Modules over MAX_LINES lines whose docstring does not say why ("over 400 lines because ...")."""
    found = {}
    for name, file in harness_modules(package).items():
        text = file.read_text(encoding="utf-8")
        lines = text.count("\n")
        if lines > MAX_LINES and f"over {MAX_LINES} lines because" not in (ast.get_docstring(ast.parse(text)) or ""):
            found[name] = lines
    return found


def test_no_module_is_over_400_lines_without_a_reason():
    over = long_modules()
    assert not over, "\n".join(f"  {name}: {n} lines; split it, or say in its docstring why it is "
                                f"\"over {MAX_LINES} lines because ...\"" for name, n in sorted(over.items()))


def test_a_reason_in_the_docstring_lets_a_long_module_be(tmp_path):
    package = tmp_path / "harness"
    package.mkdir()
    (package / "__init__.py").write_text("")
    body = "x = 1\n" * (MAX_LINES + 1)
    (package / "long.py").write_text(body)
    (package / "why.py").write_text(f'"""One table, over {MAX_LINES} lines because it is data."""\n' + body)
    assert long_modules(package) == {"harness.long": MAX_LINES + 1}


# -- one rule for golden names ----------------------------------------------------------------------
SUITE = "suite: {suite}\nchecks:\n  - id: {check}\n    kind: greedy\n    prompt: x\n"


@pytest.mark.parametrize("bad", ["基准", "-x", ".x", "_x", "a b", "a/b", "e\u0301"])
def test_a_suite_name_and_a_check_id_break_the_same_rule_with_the_same_words(tmp_path, bad):
    suite_file, check_file = tmp_path / "by-suite.yaml", tmp_path / "by-check.yaml"
    suite_file.write_text(SUITE.format(suite=f'"{bad}"', check="ok"), encoding="utf-8")
    check_file.write_text(SUITE.format(suite="ok", check=f'"{bad}"'), encoding="utf-8")
    with pytest.raises(SuiteError) as by_suite:
        load_suite(suite_file)
    with pytest.raises(SuiteError) as by_check:
        load_suite(check_file)
    rule = name_problem(bad)
    assert rule is not None and "ASCII" in rule
    assert str(by_suite.value).startswith(f"{suite_file}:1: suite: {rule} (you wrote {bad!r}).")
    assert str(by_check.value).startswith(f"{check_file}:3: checks[0].id: {rule} (you wrote {bad!r}).")


def test_a_suite_named_after_its_file_follows_the_rule_too(tmp_path):
    path = tmp_path / "-x.yaml"
    path.write_text("checks:\n  - id: a\n    kind: greedy\n    prompt: x\n", encoding="utf-8")
    with pytest.raises(SuiteError) as error:
        load_suite(path)
    assert str(error.value).startswith(f"{path}: suite: {name_problem('-x')} (the suite is named after its file")
    assert "rename the file, or set `suite: x`" in str(error.value)


def test_the_one_rule_covers_every_golden_path_component():
    """Variant keys and device classes are made by the harness, not typed: they must pass it all the same."""
    for key in ALL_KEYS:
        assert name_problem(key) is None, key
    for device_class in ("cpu", "cuda-sm80", "cuda-sm90", "cuda-sm120"):
        assert name_problem(device_class) is None, device_class
    for given in ("my model", "基准", "-x", "_x", ".hidden", "../../escaped", "x" * 300, ""):
        folder = golden_folder_name(given)
        assert name_problem(folder) is None, (given, folder)
    assert golden_folder_name("smollm2-135m") == "smollm2-135m"
    assert name_problem("a" * 100) is None and name_problem("a" * 101) is not None
    assert check_id_problem("x.meta") is not None and name_problem("x.meta") is None  # the sidecar's suffix


def test_a_registry_model_name_follows_the_same_rule(tmp_path):
    from harness.models.registry import load_registry

    path = tmp_path / "models.yaml"
    path.write_text('default: ok\nmodels:\n  ok: {embedded: "x==1"}\n  "基准": {embedded: "x==1"}\n',
                    encoding="utf-8")
    with pytest.raises(SuiteError) as error:
        load_registry(path)
    assert str(error.value).startswith(f"{path}:4: models.基准: model name '基准': {name_problem('基准')}.")


def test_bad_names_are_collection_errors_naming_file_and_key(project):
    """Through pytest: each bad name is an error of its own file; the good suite is still collected."""
    project.suite("good", SUITE.format(suite="good", check="capital"))
    project.suite("zh", SUITE.format(suite="基准", check="a"))
    project.suite("dash", SUITE.format(suite='"-x"', check="a"))
    project.suite("id-zh", SUITE.format(suite="id-zh", check="基准"))
    project.suite("id-dash", SUITE.format(suite="id-dash", check='"-x"'))
    result = project.run("--variants", "fp16", "--collect-only", "-q")
    text = result.stdout.str()
    assert "ERROR collecting" in text and "Traceback" not in text and "INTERNALERROR" not in text
    for file, key in (("zh", "suite"), ("dash", "suite"), ("id-zh", "checks[0].id"), ("id-dash", "checks[0].id")):
        line = 1 if key == "suite" else 3
        assert f"suites/{file}.yaml:{line}: {key}: it names a file or folder of the golden tree" in text, file
    result.stdout.fnmatch_lines(["suites/good.yaml::capital[[]fp16[]]"])
    assert "4 errors" in text
