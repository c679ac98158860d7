"""bench/bare_greedy.py reads the greedy checks of a suite as the harness does (defaults filled in)."""

from __future__ import annotations

from pathlib import Path

from conftest import bench_module

REPO = Path(__file__).resolve().parents[1]


def test_the_bare_script_generates_what_the_greedy_checks_of_the_suite_declare():
    checks = bench_module("bare_greedy").greedy_checks(REPO / "suites" / "generation.yaml")
    by_id = {c["id"]: c for c in checks}
    assert "generation-settings" not in by_id  # a generation_config check decodes nothing
    assert by_id["chicken-joke"]["max_new_tokens"] == 40
    assert by_id["system-and-user"]["max_new_tokens"] == 32  # the suite's default
    assert "messages" in by_id["multi-turn"] and "prompt" in by_id["capital-raw"]
