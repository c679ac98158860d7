"""A weights fingerprint names the model, not the library that wrote its config.json."""

from __future__ import annotations

import json
from pathlib import Path

from harness.models.provenance import model_fingerprint


def _model(folder: Path, *, writer: str, hidden: int = 8) -> Path:
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    config = {"model_type": "llama", "hidden_size": hidden, "transformers_version": writer}
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def test_a_config_written_by_another_transformers_is_the_same_model(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    old = model_fingerprint(_model(tmp_path / "a", writer="5.24.0"))
    new = model_fingerprint(_model(tmp_path / "b", writer="5.25.0"))
    other = model_fingerprint(_model(tmp_path / "c", writer="5.25.0", hidden=16))
    assert old == new and other != new
