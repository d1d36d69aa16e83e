"""The base models the emulator offers, as OpenAI lists them, and which of them can be tuned."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BaseModel:
    id: str
    created: int
    fine_tunable: bool = True
    methods: frozenset[str] = frozenset({"supervised", "dpo"})
    snapshot: str | None = None
    """For an alias (`gpt-4o-mini`): the dated snapshot it fine-tunes as."""

    def to_json(self) -> dict[str, object]:
        return {"id": self.id, "object": "model", "created": self.created, "owned_by": "system"}


_SUPERVISED = frozenset({"supervised"})
_REINFORCEMENT = frozenset({"reinforcement"})

BASE_MODELS: dict[str, BaseModel] = {
    model.id: model
    for model in (
        BaseModel("gpt-4o-mini-2024-07-18", 1721172717),
        BaseModel("gpt-4o-2024-08-06", 1722814719),
        BaseModel("gpt-4.1-2025-04-14", 1744315746),
        BaseModel("gpt-4.1-mini-2025-04-14", 1744317547),
        BaseModel("gpt-4.1-nano-2025-04-14", 1744321707),
        BaseModel("gpt-3.5-turbo-0125", 1706048358, methods=_SUPERVISED),
        BaseModel("babbage-002", 1692634615, methods=_SUPERVISED),
        BaseModel("davinci-002", 1692634301, methods=_SUPERVISED),
        BaseModel("o4-mini-2025-04-16", 1744133506, methods=_REINFORCEMENT),
        BaseModel("gpt-4o-mini", 1721172741, snapshot="gpt-4o-mini-2024-07-18"),
        BaseModel("gpt-4o", 1715367049, snapshot="gpt-4o-2024-08-06"),
        BaseModel("gpt-4.1", 1744316542, snapshot="gpt-4.1-2025-04-14"),
        BaseModel("gpt-4.1-mini", 1744318173, snapshot="gpt-4.1-mini-2025-04-14"),
        BaseModel("gpt-4.1-nano", 1744321025, snapshot="gpt-4.1-nano-2025-04-14"),
        BaseModel("gpt-3.5-turbo", 1677610602, methods=_SUPERVISED, snapshot="gpt-3.5-turbo-0125"),
        BaseModel("o4-mini", 1744225351, methods=_REINFORCEMENT, snapshot="o4-mini-2025-04-16"),
    )
}
