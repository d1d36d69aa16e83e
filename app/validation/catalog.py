"""The models tunegate can validate training data for: tokenizer, context limit, price.

Prices are OpenAI's published training prices (USD per 1M training tokens) as taken on
`PRICE_DATE`; a report always says which date its price is from, and callers can override the
price per validation (`engine.Target.price_override_usd_per_1m`) when it changes.

`resolve_model` accepts a dated model id, its undated alias (`gpt-4o-mini`), or a fine-tuned
model id (`ft:<base>:<org>:<suffix>:<id>`, for continued fine-tuning), which resolves to its
base model's entry.

Local open models (the `local` provider) are not known in advance: the process registers them
at start-up with `register_models` (see app/providers/local/models.py). Their `encoding` is
`hf:<model id>`, counted with the model's own tokenizer (app/validation/tokens.py); they have no
price.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

__all__ = [
    "PRICE_DATE",
    "ModelSpec",
    "encoding_for_model",
    "known_models",
    "register_models",
    "resolve_model",
    "snapshot_of",
]

PRICE_DATE: Final = "2025-06-01"

_O200K: Final = "o200k_base"
_CL100K: Final = "cl100k_base"
_SUPERVISED_AND_DPO: Final = ("supervised", "dpo")
_SUPERVISED: Final = ("supervised",)


@dataclass(frozen=True)
class ModelSpec:
    """A base model that can be fine-tuned, as far as validating data for it is concerned.

    `kind` says which data it trains on: "chat" models take chat (and DPO) data, "completion"
    models take legacy prompt/completion data. `methods` are the fine-tuning methods it
    supports. `training_usd_per_1m` is None when no price is known.
    """

    id: str
    provider: str
    encoding: str
    context_limit: int
    kind: Literal["chat", "completion"]
    methods: tuple[str, ...]
    training_usd_per_1m: float | None
    price_date: str | None


def _openai(
    model_id: str,
    usd: float,
    context: int,
    *,
    encoding: str = _O200K,
    kind: Literal["chat", "completion"] = "chat",
    methods: tuple[str, ...] = _SUPERVISED_AND_DPO,
) -> ModelSpec:
    return ModelSpec(
        id=model_id,
        provider="openai",
        encoding=encoding,
        context_limit=context,
        kind=kind,
        methods=methods,
        training_usd_per_1m=usd,
        price_date=PRICE_DATE,
    )


_MODELS: Final[tuple[ModelSpec, ...]] = (
    _openai("gpt-4o-mini-2024-07-18", 3.00, 65_536),
    _openai("gpt-4o-2024-08-06", 25.00, 65_536),
    _openai("gpt-4.1-2025-04-14", 25.00, 65_536),
    _openai("gpt-4.1-mini-2025-04-14", 5.00, 65_536),
    _openai("gpt-4.1-nano-2025-04-14", 1.50, 65_536),
    _openai("gpt-3.5-turbo-0125", 8.00, 16_385, encoding=_CL100K, methods=_SUPERVISED),
    _openai("babbage-002", 0.40, 16_384, encoding=_CL100K, kind="completion", methods=_SUPERVISED),
    _openai("davinci-002", 6.00, 16_384, encoding=_CL100K, kind="completion", methods=_SUPERVISED),
)
_BY_ID: Final[dict[str, ModelSpec]] = {spec.id: spec for spec in _MODELS}
_ALIASES: Final[dict[str, str]] = {
    "gpt-4o-mini": "gpt-4o-mini-2024-07-18",
    "gpt-4o": "gpt-4o-2024-08-06",
    "gpt-4.1": "gpt-4.1-2025-04-14",
    "gpt-4.1-mini": "gpt-4.1-mini-2025-04-14",
    "gpt-4.1-nano": "gpt-4.1-nano-2025-04-14",
    "gpt-3.5-turbo": "gpt-3.5-turbo-0125",
}
# Model families and their tokenizers, longest prefix first. Used for models that have no
# catalog entry (no price or context limit known) but whose tokenizer is certain.
_ENCODING_PREFIXES: Final = (
    ("gpt-4.1", _O200K),
    ("gpt-4o", _O200K),
    ("gpt-3.5-turbo", _CL100K),
    ("babbage-002", _CL100K),
    ("davinci-002", _CL100K),
    ("o1", _O200K),
    ("o3", _O200K),
    ("o4", _O200K),
)


# Models registered at run time (local open models), by lower-cased id.
_REGISTERED: dict[str, ModelSpec] = {}


def register_models(specs: list[ModelSpec]) -> None:
    """Add (or replace) run-time models such as the local provider's base models."""
    for spec in specs:
        if spec.id.lower() in _BY_ID or spec.id.lower() in _ALIASES:
            raise ValueError(f"{spec.id} is an OpenAI model's id; give the local model another")
        _REGISTERED[spec.id.lower()] = spec


def known_models() -> list[ModelSpec]:
    """Every model in the catalog, dated ids only (aliases resolve to these)."""
    return [*_MODELS, *_REGISTERED.values()]


def resolve_model(model: str) -> ModelSpec | None:
    """The catalog entry for a model id, alias or `ft:` model id; None when unknown."""
    name = _base_name(model)
    return _BY_ID.get(_ALIASES.get(name, name)) or _REGISTERED.get(name)


def snapshot_of(name: str) -> str:
    """The catalog id of a base model named by its id or an undated alias ("gpt-4o-mini" ->
    "gpt-4o-mini-2024-07-18"); any other name (an `ft:` model, an unknown one) as given."""
    if name.startswith("ft:"):
        return name
    spec = resolve_model(name)
    return spec.id if spec is not None else name


def encoding_for_model(model: str) -> str | None:
    """The tokenizer (encoding name) of an OpenAI model family, catalogued or not."""
    if (spec := resolve_model(model)) is not None:
        return spec.encoding
    name = _base_name(model)
    for prefix, encoding in _ENCODING_PREFIXES:
        if name == prefix or name.startswith((prefix + "-", prefix + ".")):
            return encoding
    return None


def _base_name(model: str) -> str:
    name = model.strip().lower()
    if name.startswith("ft:"):
        # ft:<base>:<org>:<suffix>:<id>; the base never contains a colon.
        name = name[3:].split(":", 1)[0]
    return name
