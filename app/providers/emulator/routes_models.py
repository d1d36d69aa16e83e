"""`/v1/models`: base models, plus fine-tuned models once their job has succeeded."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from app.providers.emulator.catalog import BASE_MODELS
from app.providers.emulator.errors import EmulatorError, model_not_found
from app.providers.emulator.state import EmulatorState, FineTunedModel


def _tuned_json(model: FineTunedModel) -> dict[str, Any]:
    return {"id": model.id, "object": "model", "created": model.created, "owned_by": model.owned_by}


def models_router(state: EmulatorState) -> APIRouter:
    router = APIRouter(prefix="/v1/models")

    @router.get("")
    async def list_models() -> dict[str, Any]:
        state.tick()
        data = [m.to_json() for m in BASE_MODELS.values()]
        data += [_tuned_json(m) for m in state.models.values()]
        return {"object": "list", "data": data}

    @router.get("/{model}")
    async def retrieve_model(model: str) -> dict[str, Any]:
        state.tick()
        if model in BASE_MODELS:
            return BASE_MODELS[model].to_json()
        if model in state.models:
            return _tuned_json(state.models[model])
        raise model_not_found(model)

    @router.delete("/{model}")
    async def delete_model(model: str) -> dict[str, Any]:
        state.tick()
        if model in BASE_MODELS:
            raise EmulatorError(
                403, f"You do not have permission to delete {model}: it is not a fine-tuned model."
            )
        if model not in state.models:
            raise model_not_found(model)
        del state.models[model]
        state.deleted_models.add(model)
        return {"id": model, "object": "model", "deleted": True}

    return router
