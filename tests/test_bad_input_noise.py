"""Bad input, noise records: a golden's recorded noise is its tolerance, so it is capped and validated like a
suite's ``tolerance:``, listed where it is wider than the built-in rule, and vouched for by its sidecar's
sha256 as the golden is. A gate run judges with nothing it cannot trust: a regression that fails against
intact goldens fails the gate whatever is edited in the sidecars.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest

from conftest import CAPITAL_SUITE, REPO, scale_weight
from harness.judge.allowance import NoiseRecordError, PathNoise, widened_by_record
from harness.checks.greedy import recorded_path_noise
from harness.errors import GoldenError
from harness.golden import GoldenStore, judged_record, meta_path, trust_problem
from harness.golden.sidecars import record_sha256
from harness.judge.tolerance import DEFAULT_TOLERANCES

RECORD = {
    "version": 1, "conditions": ["no KV cache (one forward)", "attention kernel sdpa vs eager"],
    "columns": "...", "steps": ["0.00272 0.00781 17.39", "0.00444 0.0156 15.2", "0.003 0.01 12.5"],
    "flips": {}, "logits_dtype": "float16", "environment": {"device": "cpu"},
}


def _with(**changes) -> dict:
    record = copy.deepcopy(RECORD)
    record.update(changes)
    return record


# -- the record itself: validated like a tolerance -----------------------------------------------------------
@pytest.mark.parametrize("record, said", [
    pytest.param(_with(flips={"attention kernel sdpa vs eager": ["x"]}), "not a list of step numbers 0..2",
                 id="example: flips naming no step"),
    pytest.param(_with(flips={"c": "1"}), "not a list of step numbers", id="flips as text"),
    pytest.param(_with(flips={"c": [7]}), "not a list of step numbers 0..2", id="a flip past the last step"),
    pytest.param(_with(flips={"c": [-1]}), "not a list of step numbers", id="a negative step"),
    pytest.param(_with(flips={"c": [True]}), "not a list of step numbers", id="a boolean step"),
    pytest.param(_with(flips={"c": [1.5]}), "not a list of step numbers", id="a fractional step"),
    pytest.param(_with(steps=["1000 1000 17.4"] * 3), "above the 5-nat cap", id="example: 1000 nats at every step"),
    pytest.param(_with(steps=["0.003 0.01 17.4", "2 0.01 15", "0.003 0.01 12"]), "of 8 nats at step 1",
                 id="one step above the cap"),
    pytest.param(_with(steps=["0.003 9 17.4"] * 3), "margin shift", id="a margin above the cap"),
    pytest.param(_with(steps=["0.001 0.001 60000"] * 3), "above the 5-nat cap", id="a score whose float16 unit is 32"),
    pytest.param(_with(logits_dtype="float8"), "logits_dtype 'float8'", id="an unknown dtype"),
    pytest.param(_with(steps=[]), "it has no steps", id="no steps"),
    pytest.param(_with(steps=["a b c"]), "step 0 is not three numbers", id="a step that is not numbers"),
    pytest.param(_with(conditions=[]), "missing or of the wrong type", id="no conditions"),
    pytest.param(_with(version=2), "format 2", id="another format"),
])
def test_a_malformed_or_absurd_noise_record_is_a_noise_record_error(record, said):
    with pytest.raises(NoiseRecordError, match=None) as info:
        PathNoise.from_json(record)
    assert said in str(info.value)


def test_the_record_of_a_committed_golden_reads_and_is_within_the_cap():
    assert len(PathNoise.from_json(RECORD)) == 3


def test_a_record_wider_than_the_built_in_rule_is_listed_as_widened():
    wide = PathNoise.from_json(_with(steps=["0.5 0.9 17.4", "0.003 0.01 15.2", "0.003 0.01 12.5"]))
    lines = widened_by_record(wide, DEFAULT_TOLERANCES["fp16"])
    assert lines[0].startswith("max_abs_dlogp up to 2 from the golden's recorded noise (its sidecar) at 3 of 3 "
                               "steps is wider than the fp16 defaults x3 (0.213)")
    assert any(line.startswith("max_margin_shift up to 3.6") for line in lines)
    assert widened_by_record(PathNoise.from_json(RECORD), DEFAULT_TOLERANCES["fp16"]) == ()


# -- the record as a sidecar holds it: vouched for by its sha256 ----------------------------------------------
def _sidecar(tmp_path: Path, record=RECORD, *, sha: str | None = "auto") -> Path:
    meta = {"path_noise": record}
    if sha is not None:
        meta["path_noise_sha256"] = record_sha256(record) if sha == "auto" else sha
    path = tmp_path / "c.meta.json"
    path.write_text(json.dumps(meta, indent=2, sort_keys=True))
    return path


@pytest.mark.parametrize("gate", [False, True], ids=["outside a gate", "gate"])
@pytest.mark.parametrize("case, said", [
    pytest.param("edited", "is not the one its sidecar's path_noise_sha256 vouches for", id="example: edited record"),
    pytest.param("no hash", "names no path_noise_sha256", id="hash removed"),
    pytest.param("malformed", "not a list of step numbers", id="example: malformed flips, hash recomputed"),
    pytest.param("capped", "above the 5-nat cap", id="1000 nats, hash recomputed"),
    pytest.param("no record", "has no noise record", id="record and hash removed"),
    pytest.param("other length", "has 3 steps and the golden 4", id="a record of another golden"),
    pytest.param("unreadable", "does not parse", id="not JSON"),
])
def test_a_record_that_cannot_be_trusted_falls_back_outside_a_gate_and_fails_a_gate(tmp_path, gate, case, said):
    steps = 4 if case == "other length" else 3
    if case == "edited":
        sidecar = _sidecar(tmp_path)
        meta = json.loads(sidecar.read_text())
        meta["path_noise"]["steps"] = ["1000 1000 17.4"] * 3
        sidecar.write_text(json.dumps(meta))
    elif case == "no hash":
        sidecar = _sidecar(tmp_path, sha=None)
    elif case == "malformed":
        sidecar = _sidecar(tmp_path, _with(flips={"c": ["x"]}))
    elif case == "capped":
        sidecar = _sidecar(tmp_path, _with(steps=["1000 1000 17.4"] * 3))
    elif case == "no record":
        sidecar = tmp_path / "c.meta.json"
        sidecar.write_text("{}")
    elif case == "unreadable":
        sidecar = tmp_path / "c.meta.json"
        sidecar.write_text("{not json")
    else:
        sidecar = _sidecar(tmp_path)
    if gate:
        with pytest.raises(GoldenError) as info:
            recorded_path_noise(sidecar, steps, gate=True)
        text = str(info.value)
        assert "not vouched for as this gate run's tolerance" in text and said in text and "Fix:" in text
        assert "\n" not in text
    else:
        noise, note = recorded_path_noise(sidecar, steps)
        assert noise is None and said in note and "judged with the built-in defaults" in note


def test_a_vouched_record_is_used_in_and_out_of_a_gate(tmp_path):
    sidecar = _sidecar(tmp_path)
    for gate in (False, True):
        noise, note = recorded_path_noise(sidecar, 3, gate=gate)
        assert noise is not None and note == ""


def test_an_update_writes_the_records_sha256(tmp_path):
    store = GoldenStore(root=tmp_path / "golden", model="m", device_class="cpu", update=True,
                        provenance={"model": "m"}, rootdir=tmp_path)
    path = store.path(suite="gen", check_id="c", variant="fp16")
    store.assert_matches(path, {"text": "x"}, explain=lambda e, a: "", sidecar={"path_noise": RECORD})
    assert judged_record(meta_path(path), "path_noise") == (RECORD, None)


def test_a_sidecar_without_golden_sha256_vouches_for_nothing(tmp_path):
    store = GoldenStore(root=tmp_path / "golden", model="m", device_class="cpu", update=True,
                        provenance={"model": "m"}, rootdir=tmp_path)
    path = store.path(suite="gen", check_id="c", variant="fp16")
    store.assert_matches(path, {"text": "x"}, explain=lambda e, a: "")
    assert trust_problem(path) is None
    meta = json.loads(meta_path(path).read_text())
    del meta["golden_sha256"]
    meta_path(path).write_text(json.dumps(meta))
    assert "names no golden_sha256, so it vouches for no version of its golden" in trust_problem(path)
    gate = GoldenStore(root=tmp_path / "golden", model="m", device_class="cpu", update=False,
                       provenance={"model": "m"}, rootdir=tmp_path, gate=True)
    with pytest.raises(GoldenError, match="not vouched for"):
        gate.assert_matches(path, {"text": "x"}, explain=lambda e, a: "")


def test_the_committed_goldens_noise_records_are_vouched_for_and_within_the_cap():
    """Their records are unchanged; the sidecars name each record's sha256 next to it."""
    sidecars = [p for p in (REPO / "golden").rglob("*.meta.json") if "path_noise" in json.loads(p.read_text())]
    assert len(sidecars) == 28
    for sidecar in sidecars:
        record, problem = judged_record(sidecar, "path_noise")
        assert problem is None, (sidecar, problem)
        assert PathNoise.from_json(record).cap_problem() is None
        golden = sidecar.with_name(sidecar.name.removesuffix(".meta.json") + ".json")
        assert trust_problem(golden) is None, sidecar


# -- end to end: a regression against edited sidecars, under CI ---------------------------------------------
@pytest.fixture
def regression(project, embedded_model_dir, tmp_path, monkeypatch):
    """Goldens of a model copy recorded (fp16, 6 tokens), then the copy regressed: one layer scaled by 1.2."""
    model = tmp_path / "mymodel"
    shutil.copytree(embedded_model_dir, model)
    project.suite("gen", CAPITAL_SUITE.format(n=6, extra=""))
    project.run("--model", str(model), "--variants", "fp16", "--snapshot-update").assert_outcomes(passed=1)
    scale_weight(model, "model.layers.3.mlp.down_proj.weight", 1.2)
    golden = project.golden / "mymodel/cpu/fp16/gen/capital.json"
    return project, model, golden


def _edit_meta(golden: Path, change) -> None:
    meta = json.loads(meta_path(golden).read_text())
    change(meta)
    meta_path(golden).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def _thousand_nats(meta, *, rehash: bool) -> None:
    meta["path_noise"]["steps"] = [" ".join(["1000", "1000", line.split()[2]]) for line in meta["path_noise"]["steps"]]
    if rehash:
        meta["path_noise_sha256"] = record_sha256(meta["path_noise"])


def test_a_regression_fails_the_gate_whatever_is_edited_in_the_sidecars(regression, monkeypatch):
    project, model, golden = regression
    args = ("--model", str(model), "--variants", "fp16")
    monkeypatch.setenv("CI", "true")
    intact = project.run(*args, "--harness-obtained", "obtained")
    intact.assert_outcomes(failed=1)  # the regression, against intact goldens
    saved = golden.read_text(), meta_path(golden).read_text()

    edits = {
        "example: every step's noise edited to 1000 nats": lambda m: _thousand_nats(m, rehash=False),
        "1000 nats with the record's sha256 recomputed": lambda m: _thousand_nats(m, rehash=True),
        "the noise record and its sha256 removed": lambda m: [m.pop("path_noise"), m.pop("path_noise_sha256")],
        "malformed flips": lambda m: m["path_noise"].update(flips={"c": ["x"]}),
    }
    for name, edit in edits.items():
        golden.write_text(saved[0])
        meta_path(golden).write_text(saved[1])
        _edit_meta(golden, edit)
        result = project.run(*args)
        assert result.ret == 1, (name, result.stdout.str())
        result.stdout.fnmatch_lines(["*not vouched for as this gate run's tolerance*"])
        assert "Traceback" not in result.stdout.str() and "ValueError" not in result.stdout.str(), name

    # example: the golden replaced by the regression's own output, golden_sha256 deleted from its sidecar
    shutil.copy(project.path / "obtained/mymodel/cpu/fp16/gen/capital.json", golden)
    meta_path(golden).write_text(saved[1])
    _edit_meta(golden, lambda m: m.pop("golden_sha256"))
    result = project.run(*args)
    assert result.ret == 1, result.stdout.str()
    result.stdout.fnmatch_lines(["*is not vouched for*names no golden_sha256*"])


def test_outside_a_gate_an_edited_record_is_judged_with_the_defaults_and_said(regression):
    project, model, golden = regression
    _edit_meta(golden, lambda m: _thousand_nats(m, rehash=False))
    result = project.run("--model", str(model), "--variants", "fp16")
    assert "Traceback" not in result.stdout.str()
    result.stdout.fnmatch_lines(["*its noise record is not the one its sidecar's path_noise_sha256 vouches for "
                                 "(edited by hand?): judged with the built-in defaults*"])


def test_an_edited_record_is_listed_with_the_golden_folders_untrusted_sidecars(tmp_path):
    from harness.golden import stale_sidecars, tree_report

    store = GoldenStore(root=tmp_path / "golden", model="m", device_class="cpu", update=True,
                        provenance={"model": "m"}, rootdir=tmp_path)
    path = store.path(suite="gen", check_id="c", variant="fp16")
    store.assert_matches(path, {"text": "x"}, explain=lambda e, a: "", sidecar={"path_noise": RECORD})
    assert stale_sidecars(tmp_path / "golden") == []
    _edit_meta(path, lambda m: _thousand_nats(m, rehash=False))
    assert "holds another path_noise record than the one its path_noise_sha256 names" in trust_problem(path)
    assert any("holds another path_noise record" in line for line in tree_report(tmp_path / "golden"))
    _edit_meta(path, lambda m: m.pop("path_noise_sha256"))  # an older harness's sidecar: not an edit
    assert trust_problem(path) is None
