"""`/v1/files`: upload (multipart), list, retrieve, content and delete, as OpenAI answers them."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from starlette.datastructures import UploadFile

from app.providers.emulator.errors import bad_request, file_not_found, missing_parameter
from app.providers.emulator.params import list_body, page, query_limit, query_order
from app.providers.emulator.state import EmulatorState, StoredFile

UPLOAD_PURPOSES = ("fine-tune", "assistants", "batch", "user_data", "vision", "evals")


def files_router(state: EmulatorState) -> APIRouter:
    router = APIRouter(prefix="/v1/files")

    def get_file(file_id: str) -> StoredFile:
        stored = state.files.get(file_id)
        if stored is None:
            raise file_not_found(file_id)
        return stored

    @router.post("")
    async def create_file(request: Request) -> dict[str, Any]:
        now = state.tick()
        form = await request.form()
        purpose = form.get("purpose")
        upload = form.get("file")
        if purpose is None:
            raise missing_parameter("purpose")
        if not isinstance(upload, UploadFile):
            raise missing_parameter("file")
        if purpose not in UPLOAD_PURPOSES:
            raise bad_request(
                f"'{purpose}' is not one of {list(UPLOAD_PURPOSES)} - 'purpose'",
                param="purpose",
                code="invalid_value",
            )
        filename = upload.filename or "upload"
        content = await upload.read()
        if not content:
            raise bad_request("File is empty.", param="file")
        if purpose == "fine-tune" and not filename.endswith(".jsonl"):
            raise bad_request(
                "Invalid file format for Fine-Tuning API. Must be .jsonl", param="file"
            )
        return state.add_file(filename, str(purpose), content, int(now)).to_json()

    @router.get("")
    async def list_files(request: Request) -> dict[str, Any]:
        state.tick()
        purpose = request.query_params.get("purpose")
        limit = query_limit(request, default=10_000, maximum=10_000)
        order = query_order(request)
        listed = [f for f in state.files.values() if purpose is None or f.purpose == purpose]
        position = {file_id: index for index, file_id in enumerate(state.files)}
        listed.sort(key=lambda f: (f.created_at, position[f.id]), reverse=order == "desc")
        chosen, has_more = page(listed, request.query_params.get("after"), limit, lambda f: f.id)
        return list_body([f.to_json() for f in chosen], has_more, ids=True)

    @router.get("/{file_id}")
    async def retrieve_file(file_id: str) -> dict[str, Any]:
        state.tick()
        return get_file(file_id).to_json()

    @router.get("/{file_id}/content")
    async def file_content(file_id: str) -> Response:
        state.tick()
        stored = get_file(file_id)
        media_type = "text/csv" if stored.filename.endswith(".csv") else "application/octet-stream"
        return Response(stored.content, media_type=media_type)

    @router.delete("/{file_id}")
    async def delete_file(file_id: str) -> dict[str, Any]:
        state.tick()
        get_file(file_id)
        del state.files[file_id]
        return {"id": file_id, "object": "file", "deleted": True}

    return router
