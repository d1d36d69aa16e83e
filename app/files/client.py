"""HTTP client side of `tunegate files ...`: streams a local file to a running tunegate with a
progress callback, through POST /v1/files or, past the single-request limit, the Uploads API.

The file is read in 1 MB chunks and never held in memory whole.
"""

from __future__ import annotations

import mimetypes
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2

CHUNK = 1024 * 1024
SINGLE_REQUEST_LIMIT = 512 * 1024 * 1024
PART_SIZE = 64 * 1024 * 1024

Progress = Callable[[int], None]


class TunegateError(Exception):
    """An error answer from tunegate, with the message from its envelope."""

    def __init__(self, status: int, body: Any) -> None:
        error = body.get("error", {}) if isinstance(body, dict) else {}
        self.status = status
        self.message = error.get("message") or f"HTTP {status}"
        super().__init__(f"{status}: {self.message}")


def _check(response: httpx2.Response) -> Any:
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code >= 400:
        raise TunegateError(response.status_code, body)
    return body


def _file_chunks(path: Path, start: int, length: int, progress: Progress) -> Iterator[bytes]:
    with path.open("rb") as handle:
        handle.seek(start)
        remaining = length
        while remaining > 0:
            chunk = handle.read(min(CHUNK, remaining))
            if not chunk:
                break
            remaining -= len(chunk)
            progress(len(chunk))
            yield chunk


def _multipart(
    field: str, filename: str, fields: dict[str, str], body: Iterator[bytes], size: int
) -> tuple[str, int, Iterator[bytes]]:
    boundary = uuid.uuid4().hex
    head = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()
    )
    safe_name = filename.replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")
    head += (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; '
        f'filename="{safe_name}"\r\nContent-Type: application/octet-stream\r\n\r\n'
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    def stream() -> Iterator[bytes]:
        yield head
        yield from body
        yield tail

    return f"multipart/form-data; boundary={boundary}", len(head) + size + len(tail), stream()


class TunegateClient:
    def __init__(self, base_url: str, api_key: str, timeout: float = 600.0) -> None:
        self.http = httpx2.Client(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=httpx2.Timeout(timeout, connect=10.0),
        )

    def close(self) -> None:
        self.http.close()

    def upload(
        self,
        path: Path,
        purpose: str,
        progress: Progress,
        *,
        single_request_limit: int = SINGLE_REQUEST_LIMIT,
        part_size: int = PART_SIZE,
    ) -> dict[str, Any]:
        size = path.stat().st_size
        if size > single_request_limit:
            return self._upload_in_parts(path, purpose, size, progress, part_size)
        content_type, length, body = _multipart(
            "file", path.name, {"purpose": purpose}, _file_chunks(path, 0, size, progress), size
        )
        response = self.http.post(
            "/v1/files",
            content=body,
            headers={"Content-Type": content_type, "Content-Length": str(length)},
        )
        return dict(_check(response))

    def _upload_in_parts(
        self, path: Path, purpose: str, size: int, progress: Progress, part_size: int
    ) -> dict[str, Any]:
        mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        upload = _check(
            self.http.post(
                "/v1/uploads",
                json={"filename": path.name, "purpose": purpose, "bytes": size, "mime_type": mime},
            )
        )
        part_ids: list[str] = []
        try:
            for start in range(0, size, part_size):
                length = min(part_size, size - start)
                content_type, total, body = _multipart(
                    "data", "part", {}, _file_chunks(path, start, length, progress), length
                )
                part = _check(
                    self.http.post(
                        f"/v1/uploads/{upload['id']}/parts",
                        content=body,
                        headers={"Content-Type": content_type, "Content-Length": str(total)},
                    )
                )
                part_ids.append(part["id"])
            done = _check(
                self.http.post(f"/v1/uploads/{upload['id']}/complete", json={"part_ids": part_ids})
            )
        except BaseException:
            self.http.post(f"/v1/uploads/{upload['id']}/cancel")
            raise
        return dict(done["file"])

    def list_files(self, purpose: str | None) -> list[dict[str, Any]]:
        params = {"purpose": purpose} if purpose else {}
        files: list[dict[str, Any]] = []
        after: str | None = None
        while True:
            query = params | ({"after": after} if after else {})
            page = _check(self.http.get("/v1/files", params=query))
            files += page["data"]
            if not page["has_more"] or not page["data"]:
                return files
            after = page["data"][-1]["id"]
