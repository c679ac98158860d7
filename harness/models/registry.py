"""The model registry (``models.yaml``): names users type, mapped to where weights live.

Validated with pydantic so that a typo or a YAML surprise (``revision: 0123456``
read as an octal number) is reported with the file, the line and the text the
user wrote, before anything is downloaded or loaded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from harness.errors import SuiteError
from harness.suites.names import name_problem, safe_name
from harness.suites.validation import validate
from harness.suites.yamlload import YamlMap, load_yaml, non_text_problem

FULL_SHA = re.compile(r"^[0-9a-f]{40}$")

# Attention kernels transformers dispatches on (``attn_implementation``); a hub kernel is
# written ``org/repo`` with an optional ``@revision`` and ``:function``.
ATTN_IMPLEMENTATIONS = (
    "eager", "sdpa", "flash_attention_2", "flash_attention_3", "flash_attention_4",
    "flex_attention", "paged|eager",
)
HUB_KERNEL = re.compile(r"^[\w.-]+/[\w.-]+(@[\w.-]+)?(:[\w.]+)?$")

# The 16-bit dtypes the ``fp16`` variants run in (the variant key names half precision, not float16).
HALF_DTYPES = ("float16", "bfloat16")
_DTYPE_SPELLINGS = {"fp16": "float16", "half": "float16", "torch.float16": "float16", "bf16": "bfloat16",
                    "torch.bfloat16": "bfloat16"}


def check_attn_implementation(value: str) -> str:
    """``value`` if transformers can be asked for it; otherwise a ValueError naming the choices."""
    if value in ATTN_IMPLEMENTATIONS or HUB_KERNEL.match(value):
        return value
    import difflib

    match = difflib.get_close_matches(value, ATTN_IMPLEMENTATIONS, n=1)
    raise ValueError(
        f"unknown attention implementation {value!r}"
        + (f"; did you mean {match[0]!r}?" if match else ".")
        + f" Choose one of {', '.join(ATTN_IMPLEMENTATIONS)}, or a hub kernel (org/repo)"
    )


def check_half_dtype(value: Any) -> str:
    """``value`` if it names one of ``HALF_DTYPES``; otherwise a ValueError that says what the key does."""
    if value in HALF_DTYPES:
        return str(value)
    meant = _DTYPE_SPELLINGS.get(str(value).strip().lower())
    raise ValueError(
        "not a 16-bit dtype the harness runs a model in" + (f"; did you mean {meant!r}?" if meant else ".")
        + " dtype sets the half precision of the fp16 variants (and of the layers NF4 leaves unquantized): "
        "float16 or bfloat16. Leave it out to follow the model's config.json (bfloat16 where it says so, "
        "float16 otherwise); set bfloat16 for a model trained in bfloat16 whose activations overflow float16"
    )


class ModelEntry(BaseModel):
    """One registry entry: exactly one source (``hub``, ``gguf``, ``embedded`` or a local ``path``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hub: str | None = None
    revision: str | None = None
    gguf: str | None = None
    embedded: str | None = None
    path: str | None = None
    local: list[str] = []
    dtype: str | None = None  # None: the model's config.json decides (sources.half_precision)
    chat: bool = True
    adapter: str | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False
    attn_implementation: str | None = None
    device_map: str | None = None  # accelerate's placement over GPUs, CPU and disk (harness.models.placement)
    max_memory: dict[str | int, str | int] | None = None
    offload_folder: str | None = None
    description: str = ""

    @field_validator("dtype", mode="before")
    @classmethod
    def _half_dtype(cls, value: Any) -> Any:
        return None if value is None else check_half_dtype(value)

    @field_validator("device_map")
    @classmethod
    def _known_device_map(cls, value: str | None) -> str | None:
        from harness.models.placement import check_device_map

        return None if value is None else check_device_map(value)

    @field_validator("max_memory", mode="before")
    @classmethod
    def _sizes(cls, value: Any) -> Any:
        from harness.models.placement import check_max_memory

        return None if value is None else check_max_memory(value)

    @field_validator("attn_implementation")
    @classmethod
    def _known_kernel(cls, value: str | None) -> str | None:
        return None if value is None else check_attn_implementation(value)

    @field_validator("revision", mode="before")
    @classmethod
    def _revision_is_text(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, str):
            raise ValueError(
                f"YAML read the revision as a {type(value).__name__} ({value!r}), "
                "not as text; quote it"
            )
        return value

    @model_validator(mode="after")
    def _one_source(self) -> ModelEntry:
        sources = [k for k in ("hub", "gguf", "embedded", "path") if getattr(self, k)]
        if len(sources) != 1:
            raise ValueError(
                "give exactly one of hub, gguf, embedded, path"
                + (f" (got {', '.join(sources)})" if sources else "")
            )
        if self.trust_remote_code and not (self.revision and FULL_SHA.match(self.revision)):
            raise ValueError(
                "trust_remote_code: true runs code from the model repository, so it is only "
                "allowed with a pinned revision: a full 40-hex commit id"
            )
        return self


@dataclass(frozen=True)
class Registry:
    """The whole ``models.yaml``: ``default`` is the model used without ``--model``."""

    path: Path
    default: str
    models: dict[str, ModelEntry]


def load_registry(path: Path) -> Registry:
    """Read and validate ``path``; every problem is a SuiteError naming the line."""
    if not path.is_file():
        raise SuiteError(
            path,
            "model registry not found",
            hint="pass --registry FILE, or create models.yaml at the rootdir",
        )
    data = load_yaml(path, what="model registry")
    if not isinstance(data, YamlMap):
        raise SuiteError(path, "a registry is a mapping with 'default' and 'models'", line=1)
    unknown = sorted(set(data) - {"default", "models"})
    if unknown:
        raise SuiteError(
            path, "unknown top-level key", line=data.lines[unknown[0]], key=unknown[0],
            hint="the registry has only 'default' and 'models'",
        )
    models = data.get("models")
    if not isinstance(models, YamlMap) or not models:
        raise SuiteError(
            path, "'models' must be a non-empty mapping of name to entry",
            line=data.lines.get("models", 1), key="models",
        )
    _check_model_names(path, models)
    entries = {
        str(name): validate(ModelEntry, raw, path=path, root=data, loc=("models", name))
        for name, raw in models.items()
    }
    default = data.get("default")
    if default is not None and not isinstance(default, str) and not isinstance(default, (dict, list)):
        written = data.raw.get("default", str(default))
        raise SuiteError(path, f"default {non_text_problem(written, default)}", line=data.lines.get("default", 1),
                         key="default", hint=f"write default: '{written}'")
    if default not in entries:
        raise SuiteError(
            path, f"default {default!r} is not one of the models",
            line=data.lines.get("default", 1), key="default",
            hint="known models: " + ", ".join(entries),
        )
    return Registry(path=path, default=str(default), models=entries)


def _check_model_names(path: Path, models: YamlMap) -> None:
    """A model name is its golden folder: it must be one safe path component, unique whatever the case."""
    seen: dict[str, str] = {}
    for name in models:
        text = str(name)
        line, key = models.lines.get(name, 1), f"models.{text}"
        if text in models.unquoted:
            written, value = models.unquoted[text]
            raise SuiteError(path, f"model name {non_text_problem(written, value)}", line=line,
                             key=f"models.{written}", hint=f"write '{written}': in place of {written}:")
        problem = name_problem(text)
        if problem:
            raise SuiteError(path, f"model name {text!r}: {problem}", line=line, key=key,
                             hint="rename the entry, e.g. " + repr(safe_name(text, fallback="my-model")))
        if text.casefold() in seen:
            raise SuiteError(path, f"model name {text!r} differs from {seen[text.casefold()]!r} only by case: they "
                             "would share a golden folder where case is ignored (macOS, Windows)", line=line, key=key,
                             hint="give the two models names that differ by more than case")
        seen[text.casefold()] = text
