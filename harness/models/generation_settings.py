"""The generation settings a user's ``model.generate()`` actually gets.

``generate`` starts from the call's arguments, fills what is unset from the
model's ``generation_config`` (``generation_config.json``, or the model config
when there is none), then from transformers' global defaults; a missing pad
token falls back to the first eos token. A model update that edits
``generation_config.json`` (a new eos id, sampling turned on, a repetition
penalty, a shorter max_length) changes every user's output without touching a
weight, so this is recorded as a golden (``generation_config`` kind). The greedy
golden's ``generation`` block holds the part of it that still acts under forced
greedy decoding (``greedy_settings``): a filter of the same resolution, so that
both describe the same thing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# What shapes a user's output: token ids, decoding strategy and sampling, logits
# processors, lengths and stopping, the cache. Order is the order of the golden.
SETTINGS: tuple[str, ...] = (
    "bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id",
    "do_sample", "num_beams", "num_return_sequences", "temperature", "top_k", "top_p", "min_p", "typical_p",
    "epsilon_cutoff", "eta_cutoff",
    "repetition_penalty", "encoder_repetition_penalty", "no_repeat_ngram_size", "length_penalty",
    "bad_words_ids", "suppress_tokens", "begin_suppress_tokens", "forced_bos_token_id", "forced_eos_token_id",
    "sequence_bias", "exponential_decay_length_penalty", "renormalize_logits", "remove_invalid_values",
    "guidance_scale",
    "max_length", "max_new_tokens", "min_length", "min_new_tokens", "early_stopping", "stop_strings",
    "use_cache", "cache_implementation",
)


# The settings (a subset of SETTINGS) that still act when greedy decoding is forced (logits
# processors and stopping): what shaped a greedy golden's tokens besides the weights.
GREEDY_SETTINGS: tuple[str, ...] = (
    "eos_token_id", "repetition_penalty", "no_repeat_ngram_size", "bad_words_ids", "min_length",
    "min_new_tokens", "suppress_tokens", "begin_suppress_tokens", "forced_bos_token_id",
    "forced_eos_token_id", "sequence_bias", "exponential_decay_length_penalty", "renormalize_logits",
    "remove_invalid_values", "stop_strings", "encoder_repetition_penalty", "guidance_scale",
)


def load_generation_config(model_dir: Path, *, trust_remote_code: bool = False) -> Any:
    """The GenerationConfig ``from_pretrained`` gives a model in ``model_dir``, without loading weights."""
    from transformers import AutoConfig, GenerationConfig

    try:
        return GenerationConfig.from_pretrained(str(model_dir))
    except OSError:
        config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
        return GenerationConfig.from_model_config(config)


def effective_generation_settings(generation_config: Any) -> dict[str, Any]:
    """``SETTINGS`` as ``generate()`` resolves them when the caller passes none (JSON-safe)."""
    from transformers import GenerationConfig

    effective = GenerationConfig()
    effective.update(**generation_config.to_dict(), defaults_only=True, allow_custom_entries=True)
    effective.update(**generation_config._get_default_generation_params(), defaults_only=True)
    settings = {name: plain(getattr(effective, name, None)) for name in SETTINGS}
    if settings["pad_token_id"] is None and settings["eos_token_id"] is not None:
        eos = settings["eos_token_id"]
        settings["pad_token_id"] = eos[0] if isinstance(eos, list) else eos
        settings["pad_token_id_from"] = "eos_token_id (generate's fallback: no pad token is set)"
    return settings


def greedy_settings(generation_config: Any) -> dict[str, Any]:
    """``GREEDY_SETTINGS`` as ``generate()`` resolves them, where they act.

    ``eos_token_id`` is always listed, as a sorted list (it decides where generation
    stops); the others only where their resolved value differs from what generate()
    resolves for a config that sets nothing (``repetition_penalty: 1.0`` does nothing).
    """
    from transformers import GenerationConfig

    effective = effective_generation_settings(generation_config)
    neutral = effective_generation_settings(GenerationConfig())
    settings: dict[str, Any] = {}
    for name in GREEDY_SETTINGS:
        value = effective[name]
        if name == "eos_token_id":
            eos = [] if value is None else value if isinstance(value, list) else [value]
            settings[name] = sorted(int(v) for v in eos)  # one type whether the config holds an int or a list
        elif value != neutral[name]:
            settings[name] = value
    return settings


def plain(value: Any) -> Any:
    """JSON-safe, comparable form of a config value (tuples become lists, dict keys text)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)
