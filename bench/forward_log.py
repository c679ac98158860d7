"""A pytest plugin that logs every forward pass a run makes: item, variant kind, shape, seconds.

Used by ``bench/forward_floor.py`` (``-p forward_log`` with ``bench/`` on ``PYTHONPATH``) to say
how much of a run is the model's own arithmetic and how much is everything else. It hooks
``torch.nn.Module`` globally (no architecture named) and records only the outermost causal-LM
call of each forward, so a peft wrapper and the model inside it count once. Where the log goes:
``HARNESS_FORWARD_LOG`` (JSON lines).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, TextIO

import pytest

_STATE: dict[str, Any] = {"item": None, "depth": 0, "start": 0.0, "out": None}


def variant_kind(module: Any) -> str:
    """``nf4`` / ``float16`` / ... for the weights, ``+lora`` where a peft wrapper is called."""
    quantized = bool(getattr(module, "is_loaded_in_4bit", False)) or bool(
        getattr(getattr(module, "base_model", None), "is_loaded_in_4bit", False))
    try:
        dtype = str(next(module.parameters()).dtype).removeprefix("torch.")
    except StopIteration:
        dtype = "unknown"
    lora = type(module).__name__.startswith("Peft")
    return ("nf4" if quantized else dtype) + ("+lora" if lora else "")


def _is_causal_lm(module: Any) -> bool:
    return type(module).__name__.endswith("ForCausalLM")


def _shape(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[int]:
    tensor = kwargs.get("input_ids")
    if tensor is None:
        tensor = kwargs.get("inputs_embeds")
    if tensor is None and args:
        tensor = args[0]
    return [int(n) for n in tensor.shape[:2]] if tensor is not None else [0, 0]


def _pre(module: Any, args: tuple[Any, ...]) -> None:
    if not _is_causal_lm(module):
        return
    if _STATE["depth"] == 0:
        _STATE["start"] = time.perf_counter()
    _STATE["depth"] += 1


def _post(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
    if not _is_causal_lm(module):
        return
    _STATE["depth"] -= 1
    if _STATE["depth"] == 0:
        out: TextIO = _STATE["out"]
        out.write(json.dumps({"item": _STATE["item"], "kind": variant_kind(module), "shape": _shape(args, kwargs),
                              "seconds": time.perf_counter() - _STATE["start"]}) + "\n")


def pytest_configure(config: pytest.Config) -> None:
    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

    _STATE["out"] = open(os.environ.get("HARNESS_FORWARD_LOG", "forward-log.jsonl"), "w", encoding="utf-8")
    register_module_forward_pre_hook(_pre)
    register_module_forward_hook(_post, with_kwargs=True, always_call=True)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    _STATE["item"] = item.nodeid


def pytest_unconfigure(config: pytest.Config) -> None:
    if _STATE["out"] is not None:
        _STATE["out"].close()
