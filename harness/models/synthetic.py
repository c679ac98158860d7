"""Config-only models: an architecture's shapes with random weights, for memory and speed.

Memory and speed depend on a model's shapes (hidden size, layers, heads, KV heads,
vocabulary), not on what its weights learned, so a model built from the published
``config.json`` with random weights measures what the trained one would, without
downloading it. ``materialize`` writes such a model as an ordinary local model folder
(config, safetensors, a byte-level tokenizer) plus a random LoRA adapter, so that every
variant (fp16, NF4, with and without the adapter) then loads through the pool's one
loading path (``ModelPool._from_pretrained``: bitsandbytes quantizes NF4 exactly as it
does a trained checkpoint) instead of a second path that could drift from it.

The cost is one save and one reload from disk: on a GPU machine an 8B model is 16 GB,
which ``--work-dir`` can put on a RAM disk (``/dev/shm``). The numbers that come out
say nothing about output quality: the weights are random.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import ModelLoadError, ModelNotFoundError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
SOURCE_FILE = "harness-source.json"
SPECIAL_TOKEN = "<|endoftext|>"
# A config may not ask for code from the hub (``auto_map``) or name a model type by hand-written class.
REFUSED_KEYS = ("auto_map",)

Progress = Callable[[str], None]


def shipped_configs() -> dict[str, Path]:
    """The architectures shipped with the harness, by name (``llama-3-8b``, ``tiny-llama``, ...)."""
    return {p.stem: p for p in sorted(CONFIG_DIR.glob("*.json"))}


def load_config(value: str) -> tuple[str, dict[str, Any]]:
    """``value`` is a shipped name or a ``config.json`` path; returns (name, the config's mapping)."""
    shipped = shipped_configs()
    path = shipped.get(value)
    if path is None:
        candidate = Path(value).expanduser()
        if candidate.is_dir():
            candidate = candidate / "config.json"
        if not candidate.is_file():
            close = difflib.get_close_matches(value, list(shipped), n=1)
            raise ModelNotFoundError(
                f"--config {value}: neither a shipped architecture nor a config.json file"
                + (f"; did you mean {close[0]!r}?" if close else ".")
                + f" Shipped: {', '.join(shipped)}. Fix: name one of those, or pass the path of a model's config.json."
            )
        path = candidate
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"--config {path}: not a readable JSON file ({exc}). Fix: point at a model's "
                             "config.json.") from None
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise ModelLoadError(f"--config {path}: a config.json is a JSON object with a 'model_type' key "
                             "(llama, qwen2, phi3, ...); this one has none. Fix: use the config.json of a "
                             "Hugging Face causal LM.")
    refused = [k for k in REFUSED_KEYS if k in data]
    if refused:
        raise ModelLoadError(f"--config {path}: key {refused[0]!r} asks for the model's own code from the hub "
                             "(trust_remote_code), which a config-only model never runs. Fix: delete the key "
                             "if transformers has the architecture built in (model_type).")
    name = path.stem if path.parent == CONFIG_DIR else _folder_name(path)
    return name, data


def _folder_name(path: Path) -> str:
    from harness.suites.names import safe_name

    stem = path.parent.name if path.name == "config.json" else path.stem
    return safe_name(stem)


def build_config(data: dict[str, Any]) -> Any:
    """The transformers config object of a config mapping."""
    from transformers import AutoConfig

    values = dict(data)
    model_type = values.pop("model_type")
    for key in ("transformers_version", "_name_or_path", "architectures_note"):
        values.pop(key, None)
    try:
        return AutoConfig.for_model(model_type, **values)
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"config model_type {model_type!r}: transformers cannot build it "
                             f"({str(exc).splitlines()[0]}). Fix: use an architecture this transformers "
                             "version has built in.") from None


def parameter_count(data: dict[str, Any]) -> int:
    """Parameters of the architecture (tied matrices once), counted on the meta device: no memory."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(build_config(data))
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class SyntheticModel:
    """A materialized config-only model: a local model folder and a random adapter beside it."""

    name: str
    folder: Path
    adapter: Path | None
    parameters: int
    bytes_on_disk: int
    seconds: dict[str, float] = field(default_factory=dict)

    def figures(self) -> dict[str, Any]:
        return {"name": self.name, "folder": str(self.folder), "adapter": str(self.adapter) if self.adapter else None,
                "parameters": self.parameters, "bytes_on_disk": self.bytes_on_disk, "seconds": self.seconds}


def materialize(value: str, *, out_dir: Path, device: str = "cpu", dtype: str = "float16", seed: int = 0,
                adapter: bool = True, progress: Progress = lambda _: None) -> SyntheticModel:
    """Build the architecture with random weights (in ``dtype``, directly on ``device``), save it as a
    model folder under ``out_dir/<name>``, and a random LoRA adapter under ``out_dir/<name>-lora``.

    The adapter's ``lora_B`` is random too (not peft's zero init), so it changes the output like a
    trained one and passes the pool's "adapter did load" check.
    """
    import torch
    from transformers import AutoModelForCausalLM

    name, data = load_config(value)
    config = build_config(data)
    torch_dtype = getattr(torch, dtype)
    folder = out_dir / f"{name}-random"
    adapter_dir = out_dir / f"{name}-random-lora" if adapter else None
    _check_room(out_dir, data)
    for path in (folder, adapter_dir):
        if path is not None and path.exists():
            shutil.rmtree(path)
    seconds: dict[str, float] = {}
    progress(f"{name}: random weights in {dtype} on {device}")
    torch.manual_seed(seed)
    start = time.perf_counter()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.eval()
    _sync(device)
    seconds["init"] = time.perf_counter() - start
    parameters = sum(p.numel() for p in model.parameters())
    tokenizer = byte_tokenizer()
    special = tokenizer.convert_tokens_to_ids(SPECIAL_TOKEN)
    if int(config.vocab_size) <= special:
        raise ModelLoadError(f"--config {name}: vocab_size {config.vocab_size} is smaller than the synthetic "
                             f"byte tokenizer ({special + 1} tokens). Fix: use a vocab_size of at least {special + 1}.")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(config, key, special)  # the folder's ids point at its own tokenizer's special token
        setattr(model.generation_config, key, special)
    start = time.perf_counter()
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    seconds["save"] = time.perf_counter() - start
    (folder / SOURCE_FILE).write_text(json.dumps({
        "synthetic": name, "config_sha256": hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest(),
        "seed": seed, "dtype": dtype, "note": "random weights: shapes of the architecture, no trained behaviour",
    }, indent=2, sort_keys=True))
    if adapter_dir is not None:
        start = time.perf_counter()
        save_random_adapter(model, adapter_dir, seed=seed)
        seconds["adapter"] = time.perf_counter() - start
    del model
    _free(device)
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    progress(f"{name}: {parameters:,} parameters, {size / 2**20:.1f} MiB in {folder} "
             f"(init {seconds['init']:.1f} s, save {seconds['save']:.1f} s)")
    return SyntheticModel(name=name, folder=folder, adapter=adapter_dir, parameters=parameters,
                          bytes_on_disk=size, seconds={k: round(v, 3) for k, v in seconds.items()})


def _check_room(out_dir: Path, data: dict[str, Any]) -> None:
    """Refuse before writing gigabytes into a folder that cannot hold them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    needed = int(parameter_count(data) * 2 * 1.05)
    free = shutil.disk_usage(out_dir).free
    if free < needed:
        raise ModelLoadError(f"--work-dir {out_dir}: {free / 2**30:.1f} GiB free, the random model needs about "
                             f"{needed / 2**30:.1f} GiB. Fix: pass a --work-dir with room (a RAM disk such as "
                             "/dev/shm on a machine with the memory, or a larger disk).")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def _free(device: str) -> None:
    import gc

    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def attention_targets(model: Any) -> list[str]:
    """The Linear layers of the attention blocks, by leaf name (q/k/v/o_proj, Phi-3's qkv_proj, ...).

    The embedded model's fixture adapter targets these; a model without a ``self_attn`` module
    gets every Linear except the head.
    """
    import torch

    head = model.get_output_embeddings()
    names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear) and ".self_attn." in f".{n}."})
    if names:
        return names
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and m is not head})


def save_random_adapter(model: Any, out: Path, *, seed: int = 0, rank: int = 8) -> None:
    """A LoRA adapter (r=8, alpha 16, the fixture adapter's settings) with random A and B.

    The adapter is built on the meta device (no second copy of the model) and its
    tensors filled in on the CPU, then saved the way ``save_pretrained`` writes one.
    """
    import copy

    import torch
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=attention_targets(model),
                        task_type="CAUSAL_LM", init_lora_weights=False)
    with torch.device("meta"):
        skeleton = type(model)(copy.deepcopy(model.config))
    peft_model = get_peft_model(skeleton, config)
    generator = torch.Generator().manual_seed(seed + 1)
    state = {}
    for key, meta in get_peft_model_state_dict(peft_model, save_embedding_layers=False).items():
        fan_in = meta.shape[-1]
        state[key] = (torch.randn(meta.shape, generator=generator) / fan_in ** 0.5).to(model.dtype).contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    peft_model.peft_config["default"].save_pretrained(str(out))


def byte_tokenizer() -> Any:
    """A tokenizer of 256 byte tokens and one special token: any text encodes, one token per byte.

    Speed and memory do not depend on which ids a prompt holds, only on how many, so a
    config-only model needs no trained vocabulary; every id is below any real vocab_size.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    core = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([SPECIAL_TOKEN])
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=SPECIAL_TOKEN, pad_token=SPECIAL_TOKEN,
                                   bos_token=SPECIAL_TOKEN, model_max_length=1 << 20)
