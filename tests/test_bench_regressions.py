"""bench/regressions.py counts what the gate failed per variant, and never counts an error as caught."""

from __future__ import annotations

from conftest import bench_module

SUMMARY = """\
=========================== short test summary info ============================
FAILED suites/generation.yaml::chicken-joke[fp16-lora] - generation.yaml:10: ...
FAILED suites/generation.yaml::capital-raw[nf4-lora] - generation.yaml:33: ca...
FAILED suites/generation.yaml::code-raw[nf4-lora]
ERROR suites/generation.yaml::list-raw[nf4-lora] - RuntimeError: boom
FAILED suites/tokenization.yaml::builtin-texts - tokenization.yaml:3: ...
PASSED suites/generation.yaml::multi-turn[fp16-lora]
3 failed, 1 passed, 1 error in 9.00s
"""


def test_failures_and_errors_are_counted_apart_per_variant():
    bench = bench_module("regressions")
    failed, errored = bench.count_outcomes(SUMMARY)
    assert failed == {"fp16-lora": 1, "nf4-lora": 2, bench.MODEL_LEVEL: 1}
    assert errored == {"nf4-lora": 1}
