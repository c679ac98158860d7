"""Registry validation: every mistake names the file, the line, the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.errors import ModelLoadError, SuiteError
from harness.models.registry import load_registry
from harness.models.sources import resolve

HEAD = "default: m\nmodels:\n  m:\n"


def _load(tmp_path: Path, body: str) -> str:
    path = tmp_path / "models.yaml"
    path.write_text(body)
    with pytest.raises(SuiteError) as info:
        load_registry(path)
    return str(info.value)


def test_misspelled_key_gets_did_you_mean(tmp_path):
    message = _load(tmp_path, HEAD + "    hub: org/m\n    revison: main\n")
    assert message == f"{tmp_path}/models.yaml:5: models.m.revison: unknown key. Fix: did you mean 'revision'?"


def test_revision_read_as_octal_number_is_reported_with_the_text_written(tmp_path):
    message = _load(tmp_path, HEAD + "    hub: org/m\n    revision: 0123456\n")
    assert ":5: models.m.revision:" in message
    assert "YAML read the revision as a int (42798)" in message and "quote it" in message
    assert "'0123456'" in message


def test_trust_remote_code_needs_a_full_commit(tmp_path):
    message = _load(tmp_path, HEAD + "    hub: org/m\n    revision: main\n    trust_remote_code: true\n")
    assert ":4: models.m:" in message and "40-hex commit" in message
    ok = tmp_path / "ok.yaml"
    ok.write_text(HEAD + f"    hub: org/m\n    revision: {'a' * 40}\n    trust_remote_code: true\n")
    assert load_registry(ok).models["m"].trust_remote_code


def test_exactly_one_source(tmp_path):
    assert "give exactly one of hub, gguf, embedded, path (got hub, gguf)" in _load(
        tmp_path, HEAD + "    hub: org/m\n    gguf: m.gguf\n")


def test_unknown_default_and_unsafe_tags(tmp_path):
    assert "default 'x' is not one of the models" in _load(tmp_path, "default: x\nmodels:\n  m: {hub: org/m}\n")
    message = _load(tmp_path, HEAD + "    hub: !!python/object/apply:os.system ['echo hi']\n")
    assert ":4:" in message and "unsafe or unknown YAML tag" in message


def test_wrong_type_names_key_and_value(tmp_path):
    message = _load(tmp_path, HEAD + "    hub: org/m\n    chat: maybe\n")
    assert ":5: models.m.chat:" in message and "'maybe'" in message


def test_pickle_only_folder_is_refused_unless_allowed(tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"\x80")
    registry = tmp_path / "models.yaml"
    registry.write_text(f"default: p\nmodels:\n  p: {{hub: org/p, local: [{folder}]}}\n")
    with pytest.raises(ModelLoadError, match=r"only pickle weights \(\.bin\).*allow_pickle: true"):
        resolve("p", registry=load_registry(registry), rootdir=tmp_path)
    registry.write_text(f"default: p\nmodels:\n  p: {{hub: org/p, local: [{folder}], allow_pickle: true}}\n")
    assert resolve("p", registry=load_registry(registry), rootdir=tmp_path).path == folder
    with pytest.raises(ModelLoadError, match="only pickle weights"):
        resolve(str(folder), registry=load_registry(registry), rootdir=tmp_path)


def test_the_shipped_registry_is_valid():
    registry = load_registry(Path(__file__).resolve().parents[1] / "models.yaml")
    assert registry.default == "smollm2-135m"
    assert {"smollm2-135m", "qwen-0.5b", "phi-3-mini"} <= set(registry.models)
    for name, entry in registry.models.items():
        if entry.hub:
            assert entry.revision and len(entry.revision) == 40, name
