"""Bad input and faults: each gets a clear error (file, line or key, the fix) and no golden is lost."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest



def _snapshot(root: Path) -> dict[str, str]:
    """Every file under the golden folder with its content hash."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def recorded(project):
    project.gen_suite(joke=8, capital=4)
    project.record("--variants", "fp16,fp16-lora", passed=4)
    return project


def test_missing_golden_in_ci_fails_writes_nothing_and_stays_failed(project, monkeypatch):
    monkeypatch.setenv("CI", "1")
    project.gen_suite(joke=8, capital=4)
    for _ in range(2):
        result = project.run("--variants", "fp16")
        result.assert_outcomes(failed=2)
        result.stdout.fnmatch_lines(["*No goldens are recorded for model 'smollm2-135m' on device class 'cpu'*"])
        assert _snapshot(project.golden) == {}


@pytest.mark.parametrize("damage", ["truncated", "hand-edited"])
def test_corrupt_golden_names_the_file(recorded, damage):
    path = recorded.golden / "smollm2-135m/cpu/fp16/gen/joke.json"
    text = path.read_text()
    path.write_text(text[: len(text) // 2] if damage == "truncated" else text.replace('"text"', "text"))
    before = _snapshot(recorded.golden)
    result = recorded.run("--variants", "fp16")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([
        f"*Golden file {path.relative_to(recorded.path)} is not valid JSON (line *, column *: *); it was truncated or edited by hand. "
        "Fix: restore it with `git checkout -- *joke.json`*",
    ])
    assert "Traceback" not in result.stdout.str()
    assert _snapshot(recorded.golden) == before


@pytest.mark.parametrize("killed_in", ["data", "sidecar"])
def test_update_killed_mid_write_leaves_the_previous_golden_intact(recorded, killed_in):
    path = recorded.golden / "smollm2-135m/cpu/fp16/gen/joke.json"
    sidecar = path.with_name("joke.meta.json")
    golden = json.loads(path.read_text())
    recorded_text = golden["text"]
    golden["text"] = "an older answer"
    path.write_text(json.dumps(golden, indent=2, sort_keys=True))
    meta = json.loads(sidecar.read_text())  # a sidecar that vouches for this older golden
    meta["golden_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    sidecar.write_text(json.dumps(meta))
    before, sidecar_before = path.read_bytes(), sidecar.read_bytes()
    # the process dies once the new content is in the temporary file, before its rename
    (recorded.path / "conftest.py").write_text(
        "import os, harness.golden.files\n"
        "_real = os.replace\n"
        "def _replace(src, dst):\n"
        f"    if str(dst).endswith('.meta.json') == {killed_in == 'sidecar'}:\n"
        "        os._exit(9)\n"
        "    _real(src, dst)\n"
        "harness.golden.files.os.replace = _replace\n"
    )
    result = recorded.run("--variants", "fp16", "--snapshot-update")
    assert result.ret == 9
    leftovers = sorted(p.name for p in path.parent.glob(".*.tmp"))
    assert len(leftovers) == 1
    if killed_in == "data":
        assert path.read_bytes() == before and sidecar.read_bytes() == sidecar_before
        assert leftovers[0].startswith(".joke.json.")
    else:  # the data file was renamed: the old sidecar no longer vouches for it
        assert json.loads(path.read_text())["text"] == recorded_text
        assert sidecar.read_bytes() == sidecar_before
        assert leftovers[0].startswith(".joke.meta.json.")
    (recorded.path / "conftest.py").unlink()

    result = recorded.run("--variants", "fp16")
    result.stdout.fnmatch_lines([
        "leftover temporary files in the golden folder (1), from an interrupted update: the next "
        "--snapshot-update removes them, or delete them",
        f"  {(path.parent / leftovers[0]).relative_to(recorded.path)}",
    ])
    if killed_in == "sidecar":
        result.stdout.fnmatch_lines([f"  {sidecar.relative_to(recorded.path)}: describes another version of its golden*"])
    else:
        assert "cannot be trusted" not in result.stdout.str()
    result = recorded.run("--variants", "fp16", "--snapshot-update")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["removed 1 leftover temporary files of an interrupted update from the golden folder"])
    assert list(recorded.golden.rglob("*.tmp")) == []
    assert "cannot be trusted" not in result.stdout.str()


def test_tokenizer_without_pad_and_template_and_a_short_context(project, embedded_model_dir, tmp_path):
    model = tmp_path / "nopad"
    shutil.copytree(embedded_model_dir, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("pad_token", None)
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    (model / "chat_template.jinja").unlink()
    model_config = json.loads((model / "config.json").read_text())
    model_config["max_position_embeddings"] = 16
    model_config.pop("pad_token_id", None)
    (model / "config.json").write_text(json.dumps(model_config))
    project.gen_suite(joke=8, capital=4, extra="""
  - id: long
    kind: greedy
    prompt: "one two three four five six seven eight nine ten eleven twelve thirteen"
    max_new_tokens: 8
  - id: skip-without-template
    kind: greedy
    messages: [{role: user, content: "Hi"}]
    if_no_chat_template: skip
""")
    # declared a chat model in the registry: a missing template is a defect
    with (project.path / "models.yaml").open("a", encoding="utf-8") as registry:
        registry.write(f"\n  nopad:\n    path: {model}\n    chat: true\n")
    result = project.run("--model=nopad", "--variants", "fp16", "--snapshot-update", "-rs")
    result.assert_outcomes(passed=1, failed=2, skipped=1)
    result.stdout.fnmatch_lines([
        "note: tokenizer has no pad token: using eos '<|im_end|>' (id 2) for padding",
        "SKIPPED [[]1[]] suites/gen.yaml:18: 'nopad' has no chat template, and this check renders chat messages "
        "(the check says if_no_chat_template: skip)*",
    ])
    out = result.stdout.str()
    assert ("'nopad' has no chat template, and this check renders chat messages, and its registry entry declares "
            "it a chat model (chat: true). Fix: restore its chat template; for a base model set chat: false") in out
    assert ("long: the prompt is 13 tokens and max_new_tokens is 8, which exceeds the model's context of "
            "16 tokens. Fix: shorten the prompt or lower max_new_tokens in the suite.") in out
    assert project.goldens() == ["nopad/cpu/fp16/gen/capital.json"]
    # the same folder given as a path declares nothing: a base model, whose chat checks do not apply
    result = project.run(f"--model={model}", "--variants", "fp16", "-rs", "-k", "joke")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["SKIPPED*'nopad' has no chat template, and this check renders chat messages (a base "
                                 "model: no registry entry declares it a chat model), so it does not apply*"])


def test_out_of_memory_in_one_variant_does_not_stop_the_others(recorded):
    before = _snapshot(recorded.golden)
    (recorded.path / "conftest.py").write_text(
        "import torch, harness.models.pool\n"
        "_real = harness.models.pool.ModelPool._from_pretrained\n"
        "def _load(self, variant):\n"
        "    if variant.key == 'fp16':\n"
        "        raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 20.00 MiB')\n"
        "    return _real(self, variant)\n"
        "harness.models.pool.ModelPool._from_pretrained = _load\n"
    )
    result = recorded.run("--variants", "fp16,fp16-lora", "-p", "no:randomly")
    result.assert_outcomes(passed=2, failed=2)
    result.stdout.fnmatch_lines([
        "*Out of memory while loading 'smollm2-135m' as fp16 on CPU: CUDA out of memory. Tried to allocate 20.00 MiB. "
        "The other variants still run.*",
    ])
    assert _snapshot(recorded.golden) == before
