"""Per-module activations of a decoder-only model, captured with forward hooks.

Both the full model diff (``harness-diff``) and the golden fingerprints read the
same capture, so "layer 14 (mlp)" means the same module in both. Modules are named
canonically, independent of the architecture's attribute names:
``embedding``, ``layers.<i>.input_norm``, ``layers.<i>.attention``,
``layers.<i>.post_norm``, ``layers.<i>.mlp``, ``layers.<i>.output``, ``norm``, ``head``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from harness.models.introspect import base_model

KINDS = ("embedding", "norm", "attention", "mlp", "output", "head")

_ATTENTION = re.compile(r"attn|attention", re.I)
_MLP = re.compile(r"mlp|feed_forward|ffn", re.I)
_NORM = re.compile(r"norm|^ln|_ln|ln_", re.I)


def decoder_layers(model: Any) -> Any:
    """The ModuleList of decoder layers: the longest ModuleList whose length is the layer count."""
    import torch

    model = base_model(model)
    wanted = getattr(model.config, "num_hidden_layers", None)
    best = None
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0 and (wanted is None or len(module) == wanted):
            if best is None or len(module) > len(best):
                best = module
    if best is None:
        raise ValueError(f"{type(model).__name__}: no list of decoder layers found; cannot localize")
    return best


def module_kind(name: str) -> str:
    """``attention``, ``mlp``, ``norm``, ``embedding``, ``head`` or ``output`` for a canonical name."""
    last = name.rsplit(".", 1)[-1]
    if last == "norm" or last.endswith("_norm") or last.startswith("post_norm"):
        return "norm"
    return last if last in KINDS else "output"


def named_modules(model: Any) -> list[tuple[str, Any]]:
    """(canonical name, module) for everything worth hooking, in definition order."""
    inner = base_model(model)
    layers = decoder_layers(inner)
    found: list[tuple[str, Any]] = [("embedding", inner.get_input_embeddings())]
    for index, layer in enumerate(layers):
        norms = 0
        for child_name, child in layer.named_children():
            if _NORM.search(child_name):  # before attention: "post_attention_layernorm" is a norm
                label = "input_norm" if norms == 0 else "post_norm" + (str(norms) if norms > 1 else "")
                found.append((f"layers.{index}.{label}", child))
                norms += 1
            elif _ATTENTION.search(child_name):
                found.append((f"layers.{index}.attention", child))
            elif _MLP.search(child_name):
                found.append((f"layers.{index}.mlp", child))
        found.append((f"layers.{index}.output", layer))
    final_norm = _final_norm(inner, layers)
    if final_norm is not None:
        found.append(("norm", final_norm))
    head = inner.get_output_embeddings()
    if head is not None:
        found.append(("head", head))
    return found


def _final_norm(model: Any, layers: Any) -> Any:
    for _, module in model.named_modules():
        for child_name, child in module.named_children():
            if child is layers:
                norm = getattr(module, "norm", None) or getattr(module, "final_layernorm", None) \
                    or getattr(module, "ln_f", None)
                return norm
    return None


def layer_index(name: str) -> int | None:
    match = re.match(r"layers\.(\d+)\.", name)
    return int(match.group(1)) if match else None


@contextmanager
def capturing(model: Any, rows: list[int] | None = None) -> Iterator[dict[str, Any]]:
    """Hooks that store each module's output (float32, CPU), in execution order, per forward.

    ``rows``: keep only these positions (a fingerprint needs three, not the whole sequence).
    """
    store: dict[str, Any] = {}
    handles = []

    def hook(name: str) -> Any:
        def record(_module: Any, _inputs: Any, output: Any) -> None:
            tensor = (output[0] if isinstance(output, tuple) else output).detach()[0]
            store[name] = (tensor if rows is None else tensor[rows]).float().cpu()
        return record

    modules = named_modules(model)
    names = [name for name, _ in modules]
    if len(set(names)) != len(names):
        raise ValueError(f"{type(base_model(model)).__name__}: two submodules of one layer map to one name; "
                         "cannot localize")
    for name, module in modules:
        handles.append(module.register_forward_hook(hook(name)))
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


def capture(model: Any, input_ids: list[int], rows: list[int] | None = None) -> dict[str, Any]:
    """One forward pass over ``input_ids``; every hooked module's output, [positions, hidden]."""
    import torch

    device = next(model.parameters()).device
    ids = torch.tensor([list(input_ids)], device=device)
    with capturing(model, rows) as store, torch.inference_mode():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    return dict(store)


def relative_difference(expected: Any, actual: Any) -> float:
    """||actual - expected|| / ||expected|| (Frobenius); inf for a shape change or non-finite values."""
    import torch

    if expected.shape != actual.shape:
        return float("inf")
    if not (torch.isfinite(actual).all() and torch.isfinite(expected).all()):
        return float("inf")
    scale = float(expected.norm())
    diff = float((actual - expected).norm())
    if diff == 0.0:
        return 0.0
    return diff / scale if scale > 0 else float("inf")
