"""Where a run ran: the machine's numerics, described, recorded and compared with a golden's (no model)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from harness.models import machine
from harness.golden.sidecars import provenance_lines, recorded_provenance
from harness.models.machine import (
    DEQUANT_NATIVE, DEQUANT_TORCH, FIELDS, FUSED_KERNELS, FUSED_NATIVE, NOT_RECORDED, NUMERICS_KEY, REFERENCE_PACKED,
)
from harness.models.provenance import describe_changes
from harness.models.machine import library_versions
from harness.report.markdown import Header, Side

HERE = {"cpu": "AMD EPYC", "avx512f": False, "avx512_bf16": False, "amx": False, "torch_cpu_capability": "AVX2",
        "aten_cpu_capability": None, "threads": 2, "bnb_4bit_kernel": DEQUANT_NATIVE}
THERE = {**HERE, "cpu": "AMD EPYC 9V74", "avx512f": True, "avx512_bf16": True, "torch_cpu_capability": "AVX512",
         "bnb_4bit_kernel": FUSED_NATIVE}
VERSIONS = {"python": "3.11.7", "torch": "2.13.0+cpu", "transformers": "5.25.0", "kernels": "0.19.1"}


def provenance(**changes):
    base = {"model": "m", "device": "cpu", "attn_implementation": "sdpa", "versions": dict(VERSIONS),
            "model_fingerprint": "aaa", NUMERICS_KEY: dict(HERE)}
    return {**base, **changes}


def bnb_has_avx512bf16() -> bool:
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


# -- describing this machine ---------------------------------------------------------------


def test_this_machine_is_described_as_torch_and_bitsandbytes_see_it():
    values = machine.numerics("cpu")
    assert set(values) == {key for key, _ in FIELDS} | {"aten_cpu_capability"}
    assert values["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert values["avx512f"] == torch.cpu._is_avx512_supported()
    assert values["avx512_bf16"] == torch.cpu._is_avx512_bf16_supported()
    assert values["bnb_4bit_kernel"] in (FUSED_KERNELS, FUSED_NATIVE, DEQUANT_NATIVE, DEQUANT_TORCH, REFERENCE_PACKED)
    json.dumps(values)  # recorded in sidecars and result files as it is


def test_threads_are_read_when_asked_not_when_first_described():
    """An xdist worker sets its share after start-up: the recorded count is the one the model ran with."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert machine.numerics("cpu")["threads"] == 1
        torch.set_num_threads(2)
        assert machine.numerics("cpu")["threads"] == 2
    finally:
        torch.set_num_threads(before)


def test_aten_cpu_capability_is_honoured_and_said():
    """torch dispatches to the kernels ATEN_CPU_CAPABILITY names; a run forced so says it."""
    code = ("import json, torch; from harness.models import machine; "
            "print(json.dumps([machine.torch_cpu_capability(), machine.describe({'torch_cpu_capability': "
            "machine.torch_cpu_capability(), 'aten_cpu_capability': __import__('os').environ['ATEN_CPU_CAPABILITY']})]))")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, timeout=300)
    capability, described = json.loads(out.stdout.strip().splitlines()[-1])
    assert capability == "DEFAULT"
    assert "torch CPU capability: DEFAULT (ATEN_CPU_CAPABILITY=default)" in described


@pytest.mark.skipif(not bnb_has_avx512bf16(), reason="this CPU has no AVX512-BF16: bitsandbytes registers no fused "
                    "4-bit kernel here (the dequantize path is tested instead)")
def test_on_avx512_bf16_the_fused_kernel_is_named():
    assert machine.bnb_4bit_kernel("cpu") in (FUSED_KERNELS, FUSED_NATIVE)


@pytest.mark.skipif(bnb_has_avx512bf16(), reason="this CPU has AVX512-BF16: bitsandbytes runs its fused 4-bit kernel "
                    "here (tested instead)")
def test_without_avx512_bf16_the_dequantize_path_is_named():
    assert machine.bnb_4bit_kernel("cpu") == DEQUANT_NATIVE


@pytest.mark.skipif(bnb_has_avx512bf16(), reason="this CPU has AVX512-BF16: a cpu-packed session runs the fused "
                    "kernel here, not the torch stand-in")
def test_a_session_on_the_packed_layout_names_the_stand_in_kernel():
    from harness.run import cpu_packed

    assert cpu_packed.register_reference_kernel()
    try:
        assert machine.bnb_4bit_kernel("cpu") == REFERENCE_PACKED
    finally:
        cpu_packed.unregister_reference_kernel()
    assert machine.bnb_4bit_kernel("cpu") == DEQUANT_NATIVE


def test_each_bitsandbytes_cpu_path_is_named(monkeypatch):
    """What bitsandbytes registered decides the name, whatever this CPU is."""
    import importlib

    import bitsandbytes.cextension as cext

    ops = importlib.import_module("bitsandbytes.backends.cpu.ops")
    monkeypatch.setattr(ops, "gemm_4bit_forward_kernel", object(), raising=False)
    assert machine.bnb_4bit_kernel("cpu") == FUSED_KERNELS
    monkeypatch.setattr(ops, "gemm_4bit_forward_kernel", None)
    assert machine.bnb_4bit_kernel("cpu") == FUSED_NATIVE
    monkeypatch.delattr(ops, "gemm_4bit_forward_kernel")
    assert machine.bnb_4bit_kernel("cpu") == DEQUANT_NATIVE
    monkeypatch.setattr(cext, "lib", cext.ErrorHandlerMockBNBNativeLibrary("no library"))
    assert machine.bnb_4bit_kernel("cpu") == DEQUANT_TORCH
    assert "cuda kernels" in machine.bnb_4bit_kernel("cuda")


def test_cpu_features_fall_back_to_proc_cpuinfo(monkeypatch, tmp_path):
    monkeypatch.delattr(torch.cpu, "_is_avx512_supported")
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: X\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n")
    assert machine.cpu_features(cpuinfo=info) == {"avx512f": True, "avx512_bf16": True, "amx": False}
    assert machine._proc_cpuinfo_flags(tmp_path / "absent") is None


def test_description_says_yes_no_and_unknown():
    text = machine.describe({**HERE, "amx": None})
    assert text.startswith("CPU: AMD EPYC; AVX-512: no; AVX512-BF16: no; AMX: unknown; torch CPU capability: AVX2; "
                           "torch threads: 2; bitsandbytes 4-bit kernel: dequantize")
    assert machine.describe(None) == NOT_RECORDED


# -- a failing golden names what moved -------------------------------------------------------


def test_a_machine_difference_is_named_field_by_field():
    (line,) = machine.numerics_changes(THERE, HERE)
    assert "the model need not have changed" in line
    assert "AVX-512 yes -> no" in line and "AVX512-BF16 yes -> no" in line
    assert "torch CPU capability AVX512 -> AVX2" in line
    assert f"bitsandbytes 4-bit kernel {FUSED_NATIVE} -> {DEQUANT_NATIVE}" in line
    assert "9V74" not in line  # the CPU's name is shown, never compared
    assert machine.numerics_changes({**HERE, "cpu": "other"}, HERE) == []


def test_an_older_sidecar_says_not_recorded_and_shows_this_run():
    (line,) = machine.numerics_changes(None, HERE)
    assert line.startswith("this machine's numerics were not recorded with this golden")
    assert "torch CPU capability: AVX2" in line


def test_versions_are_named_as_versions_not_as_a_model_change():
    recorded = provenance(versions={**VERSIONS, "transformers": "5.24.0"})
    recorded["versions"].pop("kernels")  # a library an older harness did not record is not a change
    lines = describe_changes(recorded, provenance())
    assert lines == ["library versions differ from the golden's (a new release can move outputs: to tell, run "
                     "with the golden's versions; re-record only after reviewing the diff): "
                     "transformers 5.24.0 -> 5.25.0"]


def test_a_failure_message_names_the_version_and_machine_but_blames_no_model(tmp_path):
    golden = tmp_path / "g.json"
    golden.write_text("{}")
    recorded = provenance(versions={**VERSIONS, "torch": "2.12.0+cpu"}, **{NUMERICS_KEY: THERE})
    (tmp_path / "g.meta.json").write_text(json.dumps(recorded))
    text = provenance_lines(golden, provenance())
    assert "The model (or adapter) changed" not in text
    assert "  provenance: library versions differ from the golden's" in text and "torch 2.12.0+cpu -> 2.13.0+cpu" in text
    assert "  provenance: the machine's numerics differ from the golden's" in text
    changed_model = provenance_lines(golden, provenance(model_fingerprint="bbb"))
    assert changed_model.startswith("The model (or adapter) changed since these goldens were recorded")


# -- this run beside the goldens ------------------------------------------------------------


def test_versus_counts_disagreeing_sidecars_and_marks_what_differs():
    older = provenance(versions={k: v for k, v in VERSIONS.items() if k != "kernels"})
    older.pop(NUMERICS_KEY)
    recorded = [provenance(), provenance(versions={**VERSIONS, "transformers": "5.24.0"}), older]
    rows = {row.label: row for row in machine.versus(provenance(), recorded)}
    assert rows["transformers"].recorded == "5.25.0 (2), 5.24.0 (1)" and rows["transformers"].differs
    assert rows["kernels"].recorded == f"0.19.1 (2), {NOT_RECORDED} (1)" and not rows["kernels"].differs
    assert rows["torch"].recorded == "2.13.0+cpu" and not rows["torch"].differs
    assert rows["AVX-512"].recorded == f"no (2), {NOT_RECORDED} (1)"
    there = {row.label: row for row in machine.versus(provenance(), [provenance(**{NUMERICS_KEY: THERE})])}
    assert there["AVX-512"].differs and there["bitsandbytes 4-bit kernel"].differs
    assert not there["CPU"].differs  # shown, never compared


def test_summary_lines_say_same_or_what_moved():
    same = machine.summary_lines(provenance(), [provenance()] * 3)
    assert same[0].startswith("numerics: CPU: AMD EPYC")
    assert same[1] == "libraries: python 3.11.7, torch 2.13.0+cpu, transformers 5.25.0, kernels 0.19.1"
    assert same[2] == ("goldens compared (3) were recorded with the same device, attention kernel, libraries and "
                       "numerics as this run")
    old = provenance(versions={**VERSIONS, "transformers": "5.24.0"})
    old.pop(NUMERICS_KEY)
    moved = machine.summary_lines(provenance(), [old])
    assert moved[2] == "goldens compared (1) were recorded with: transformers 5.24.0 (this run 5.25.0); the rest as this run"
    assert moved[3].startswith("not recorded with those goldens (an older harness): CPU, AVX-512")
    assert machine.summary_lines(provenance(), [])[2:] == []


def test_markdown_table_puts_this_run_beside_the_goldens():
    lines = machine.markdown_lines(provenance(), [provenance(**{NUMERICS_KEY: THERE})])
    assert lines[0] == "## Where this ran"
    assert "| **AVX-512** | no | yes |" in lines
    assert "| transformers | 5.25.0 | 5.25.0 |" in lines
    assert "No golden was compared in this run." in machine.markdown_lines(provenance(), [])


def test_recorded_groups_round_trip_through_a_result_header():
    recorded = [provenance(), provenance(), provenance(device="cuda-sm80")]
    groups = machine.recorded_groups(recorded)
    assert [g["count"] for g in groups] == [2, 1] and "model_fingerprint" not in groups[0]
    header = Header(model=Side(name="m", provenance=provenance()), recorded=groups)
    from dataclasses import asdict

    again = Header.from_dict(json.loads(json.dumps(asdict(header))))
    assert [r["device"] for r in machine.expand_groups(again.recorded)] == ["cpu", "cpu", "cuda-sm80"]
    assert Header.from_dict({"model": {"name": "m"}}).recorded == []  # a result written before the field


def test_recorded_provenance_reads_only_sidecars_that_vouch_for_their_golden(tmp_path):
    good, stale, bare = (tmp_path / f"{n}.json" for n in ("good", "stale", "bare"))
    for path in (good, stale, bare):
        path.write_text("{}")
    (tmp_path / "good.meta.json").write_text(json.dumps(provenance()))
    (tmp_path / "stale.meta.json").write_text(json.dumps({**provenance(), "golden_sha256": "0" * 64}))
    assert recorded_provenance([good, stale, bare]) == [provenance()]


def test_library_versions_include_the_kernels_package():
    """bitsandbytes takes its fused CPU 4-bit kernel from it where it loads."""
    assert "kernels" in library_versions()


def test_the_report_header_names_the_numerics_and_what_the_goldens_differ_in():
    from harness.report.markdown import render_markdown
    from harness.report.record import SessionRecord

    old = provenance(versions={**VERSIONS, "transformers": "5.24.0"})
    header = Header(model=Side(name="m", provenance=provenance(revision=None, source="s", tokenizer_fingerprint="t",
                                                               adapter_fingerprint=None), device="CPU"),
                    recorded=machine.recorded_groups([old]))
    text = render_markdown(header, SessionRecord(), exitstatus=0, seconds=1.0)
    assert "- numerics: CPU: AMD EPYC; AVX-512: no" in text
    assert "- goldens compared (1) were recorded with: transformers 5.24.0 (this run 5.25.0); the rest as this run" in text
    assert "| **transformers** | 5.25.0 | 5.24.0 |" in text


# -- one run on the real model (tokenizer goldens: no forward pass) ------------------------------

from test_report_paths import TOK_SUITE  # noqa: E402  (the same one-check tokenizer suite)


def test_a_run_records_its_numerics_and_reports_them_beside_the_goldens(project):
    import hashlib

    project.suite("tok", TOK_SUITE)
    project.run("--variants", "fp16", "--snapshot-update").assert_outcomes(passed=1)
    golden = project.golden / "smollm2-135m/tokenizer/tok/short.json"
    sidecar = golden.with_name("short.meta.json")
    meta = json.loads(sidecar.read_text(encoding="utf-8"))
    assert meta[NUMERICS_KEY]["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert meta[NUMERICS_KEY]["bnb_4bit_kernel"] == machine.bnb_4bit_kernel("cpu")
    assert "kernels" in meta["versions"]

    green = project.run("--variants", "fp16", "--harness-report", "report.md", "--harness-result", "result.json")
    green.assert_outcomes(passed=1)
    header = json.loads((project.path / "result.json").read_text(encoding="utf-8"))["header"]
    assert header["model"]["provenance"][NUMERICS_KEY] == meta[NUMERICS_KEY]
    assert [group["count"] for group in header["recorded"]] == [1]  # what harness-report merge shows
    green.stdout.fnmatch_lines([
        "numerics: CPU: *; AVX-512: *; AVX512-BF16: *; torch CPU capability: *; torch threads: *; "
        "bitsandbytes 4-bit kernel: *",
        "libraries: python *, torch *",
        "goldens compared (1) were recorded with the same device, attention kernel, libraries and numerics as this run",
    ])
    report = (project.path / "report.md").read_text(encoding="utf-8")
    assert "- numerics: CPU: " in report and "## Where this ran" in report
    assert "| goldens compared (1) were recorded with |" in report

    # the golden recorded under another transformers on a CPU with AVX-512 (its sidecar still vouches for it)
    data = json.loads(golden.read_text(encoding="utf-8"))
    data["texts"][0]["ids"][1] += 1
    golden.write_text(json.dumps(data), encoding="utf-8")
    meta["versions"]["transformers"] = "4.0.0"
    meta[NUMERICS_KEY]["avx512f"] = not meta[NUMERICS_KEY]["avx512f"]
    meta["golden_sha256"] = hashlib.sha256(golden.read_bytes()).hexdigest()
    sidecar.write_text(json.dumps(meta), encoding="utf-8")
    red = project.run("--variants", "fp16", "--harness-report", "report.md")
    red.assert_outcomes(failed=1)
    red.stdout.fnmatch_lines([
        "*provenance: library versions differ from the golden's*: transformers 4.0.0 -> *",
        "*provenance: the machine's numerics differ from the golden's*: AVX-512 *",
    ])
    red.stdout.no_fnmatch_line("*The model (or adapter) changed*")
    red.stdout.fnmatch_lines(["goldens compared (1) were recorded with: *transformers 4.0.0 (this run *"])
    assert "| **AVX-512** |" in (project.path / "report.md").read_text(encoding="utf-8")


def test_an_xdist_controller_takes_the_numerics_of_a_worker_that_ran_the_model():
    """The controller loads no model: it reports where the model ran rather than importing bitsandbytes."""
    from types import SimpleNamespace

    from harness.plugin import _Recorder
    from harness.report.record import SessionRecord

    state = SimpleNamespace(worker_numerics=None)
    recorder = _Recorder(SessionRecord(), state)  # type: ignore[arg-type]
    for worker, output in (("gw0", {}), ("gw1", {"harness_numerics": HERE}), ("gw2", {"harness_numerics": THERE})):
        recorder.pytest_testnodedown(SimpleNamespace(workeroutput=output, gateway=SimpleNamespace(id=worker)), None)
    assert state.worker_numerics == HERE


def test_a_merge_says_when_its_shards_ran_on_machines_with_other_numerics():
    def header(values):
        return {"model": {"name": "m", "provenance": provenance(**{NUMERICS_KEY: values})}}

    assert machine.shard_note([(1, header(HERE)), (2, header({**HERE, "threads": 8, "cpu": "other"}))]) == []
    (note, _) = machine.shard_note([(1, header(HERE)), (2, header(THERE)), (3, header(HERE))])
    assert note.startswith("Note: the shards ran on machines with different numerics (shard 1, 3: AVX-512 no")
    assert "shard 2: AVX-512 yes, AVX512-BF16 yes" in note
