"""Where goldens live: the layout of the golden tree, and the guards that keep every read and write inside it.

Layout, under ``--golden-dir``::

    <model>/tokenizer/<suite>/<check>.json                 tokenizer and chat template
    <model>/<device-class>/<variant>/<suite>/<check>.json  behaviour of a loaded variant

Every component is one name that passes ``harness.suites.names.name_problem`` (checked where the
name enters); ``contained`` refuses a path that a symlink leads out of the golden folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from harness.errors import GoldenError, SuiteError
from harness.suites.names import META_SUFFIX

TOKENIZER_SCOPE = "tokenizer"


def meta_path(path: Path) -> Path:
    """The provenance sidecar of the golden at ``path``."""
    return path.with_name(path.stem + META_SUFFIX)


def golden_path(root: Path, *, model: str, device_class: str, variant: str | None, suite: str,
                check_id: str) -> Path:
    """The golden of one check, refused if it resolves outside ``root``.

    The names were checked by ``harness.suites.names`` where they entered (registry, suite, check
    spec, ``--golden-device``); containment is checked here again, because a symlink in the
    tree can lead out of it whatever the names are.
    """
    scope = [TOKENIZER_SCOPE] if variant is None else [device_class, variant]
    return contained(root, root.joinpath(model, *scope, suite, f"{check_id}.json"))


def contained(root: Path, path: Path) -> Path:
    """``path``, if it resolves (symlinks followed) inside ``root``; a GoldenError otherwise."""
    real_root, real = root.resolve(), path.resolve()
    if real != real_root and real_root not in real.parents:
        raise GoldenError(
            f"Refusing to use golden path {path}: it resolves to {real}, outside the golden folder "
            f"{real_root} (through a symlink, or a model, suite or check name with '/' or '..'). "
            "Goldens are only read and written inside --golden-dir. Fix: replace the symlink with a "
            "real folder inside the golden folder, or rename the model, suite or check."
        )
    return path


def overlap_problem(golden_dir: Path, obtained_dir: Path) -> str | None:
    """Why ``--harness-obtained`` may not be used with this golden folder, or None."""
    golden, obtained = golden_dir.resolve(), obtained_dir.resolve()
    if golden == obtained or golden in obtained.parents or obtained in golden.parents:
        where = "is" if golden == obtained else ("is inside" if golden in obtained.parents else "contains")
        return (
            f"--harness-obtained {obtained_dir} {where} the golden folder {golden}: a failing run would "
            "write what it obtained over the goldens, and the next run would pass. Fix: give a folder "
            "outside the golden folder, such as obtained/ next to it."
        )
    return None


@dataclass
class SuiteNames:
    """Suite names key golden folders: two suite files in one session may not share one."""

    files: dict[str, Path] = field(default_factory=dict)

    def claim(self, name: str, path: Path) -> None:
        key = name.casefold()  # macOS and Windows file systems ignore case
        first = self.files.setdefault(key, path)
        if first.resolve() != path.resolve():
            raise SuiteError(
                path, f"suite name {name!r} is also used by {first}: suites keep their goldens in a "
                "folder named after the suite (names that differ only by case included), so the two "
                "would read and overwrite each other's goldens", key="suite",
                hint="give one of them its own `suite:` name",
            )


def nearest_class(device_class: str, classes: list[str]) -> str | None:
    """The recorded class closest to ``device_class``: a CUDA class with the nearest compute capability, else cpu."""
    def capability(name: str) -> int | None:
        digits = name.removeprefix("cuda-sm")
        return int(digits) if name.startswith("cuda-sm") and digits.isdigit() else None

    mine = capability(device_class)
    cuda = [c for c in classes if capability(c) is not None]
    if mine is not None and cuda:
        return min(cuda, key=lambda c: (abs(capability(c) - mine), c))  # type: ignore[operator]
    if "cpu" in classes:
        return "cpu"
    return cuda[0] if cuda else (classes[0] if classes else None)

