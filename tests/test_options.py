"""Command-line options: bad values end the session at once with one clear paragraph."""

from __future__ import annotations

import time

import pytest

SUITE = """
checks:
  - id: capital
    kind: greedy
    prompt: "The capital of France is"
    max_new_tokens: 4
"""


def _assert_usage_error(result: pytest.RunResult, *patterns: str) -> None:
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str() + result.stderr.str()
    result.stderr.fnmatch_lines(list(patterns))
    assert "Traceback" not in result.stdout.str() + result.stderr.str()


def test_unknown_variant(project):
    project.suite("s", SUITE)
    _assert_usage_error(project.run("--variants", "fp16,fp8"),
                        "*--variants: unknown variant 'fp8'. Fix: choose from fp16,nf4,fp16-lora,nf4-lora*")


@pytest.mark.parametrize("value", [",", "", " , "])
def test_variants_that_select_nothing(project, value):
    project.suite("s", SUITE)
    _assert_usage_error(project.run("--variants", value),
                        f"*--variants {value!r} selects no variant, so every per-variant check would silently "
                        "disappear. Fix: list at least one of fp16,nf4,fp16-lora,nf4-lora*")


def test_report_and_obtained_paths_that_cannot_be_used(project):
    project.suite("s", SUITE)
    (project.path / "afile").write_text("x")
    _assert_usage_error(project.run("--harness-report", "afile/report.md"),
                        "*--harness-report afile/report.md: *afile is a file, not a folder*")
    _assert_usage_error(project.run("--harness-obtained", "afile"),
                        "*--harness-obtained afile: this is a file, not a folder*")
    _assert_usage_error(project.run("--registry", "missing.yaml"), "*--registry missing.yaml: no such file*")
    _assert_usage_error(project.run("--adapter", "no-such-adapter"),
                        "*--adapter no-such-adapter: no such folder; an adapter is a folder with adapter_config.json*")
    _assert_usage_error(project.run("--adapter", "afile"), "*--adapter afile: this is a file;*")


def test_a_reference_adapter_is_checked_like_the_adapter(project):
    project.suite("s", SUITE)
    (project.path / "afile").write_text("x")
    _assert_usage_error(project.run("--reference-adapter", "fixtures/adapters/smollm2-135m-pirate"),
                        "*--reference-adapter fixtures/adapters/smollm2-135m-pirate without --reference: it is the "
                        "adapter of the reference model (OLD)*Fix: add --reference OLD*")
    _assert_usage_error(project.run("--reference", "smollm2-135m", "--reference-adapter", "no-such-adapter"),
                        "*--reference-adapter no-such-adapter: no such folder; an adapter is a folder with "
                        "adapter_config.json*Fix: pass that folder.")
    _assert_usage_error(project.run("--reference", "smollm2-135m", "--reference-adapter", "afile"),
                        "*--reference-adapter afile: this is a file;*")
    _assert_usage_error(project.run("--reference", "smollm2-135m", "--reference-adapter", "qwen-0.5b"),
                        "*--reference-adapter qwen-0.5b: the registry entry 'qwen-0.5b' has no `adapter:`*")
    result = project.run("--reference", "smollm2-135m", "--reference-adapter", "smollm2-135m", "--collect-only")
    assert result.ret == 0, result.stderr.str()  # a registry name stands for its entry's adapter


def test_golden_dir_that_is_a_file(project):
    project.suite("s", SUITE)
    (project.path / "afile").write_text("x")
    _assert_usage_error(project.run("--golden-dir", "afile"), "*--golden-dir *afile: this is a file, not a folder*")


def test_model_that_does_not_exist(project):
    project.suite("s", SUITE)
    _assert_usage_error(project.run("--model", "no-such-model"),
                        "*--model no-such-model: not a model in the registry*known: smollm2-135m, qwen-0.5b, phi-3-mini*")


def test_hub_model_without_weights_stops_quickly_with_the_fetch_command(project, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    project.suite("s", SUITE)
    start = time.perf_counter()
    result = project.run("--model", "qwen-0.5b")
    assert time.perf_counter() - start < 60
    _assert_usage_error(
        result,
        "*Model 'qwen-0.5b' (Qwen/Qwen1.5-0.5B@8f445e3628f3500ee69f24e1303c9f10f5342a39) was not found*"
        "models/qwen-0.5b*hf download Qwen/Qwen1.5-0.5B --revision 8f445e36*",
    )


def test_lora_variant_without_an_adapter(project, embedded_model_dir):
    project.suite("s", SUITE)
    _assert_usage_error(project.run("--model", str(embedded_model_dir), "--variants", "fp16-lora"),
                        "*--variants asks for a -lora variant but no adapter is known for this model*")


def test_cuda_device_without_a_gpu(project):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    project.suite("s", SUITE)
    _assert_usage_error(project.run("--device", "cuda"), "*--device cuda: torch sees no CUDA device here*")


def test_options_are_listed_in_help(project):
    result = project.run("--help")
    result.stdout.fnmatch_lines([
        "*behaviour tests of causal language models (harness)*",
        "*--model=NAME|PATH*", "*--registry=FILE*", "*--variants=LIST*", "*--adapter=PATH*",
        "*--reference-adapter=PATH|NAME*", "*--device=*", "*--golden-dir=DIR*", "*--allow-update-in-ci*",
    ])
