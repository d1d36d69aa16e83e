"""Blob storage: a local directory (one node) or an S3-compatible bucket (several nodes).

Incoming bytes are first spooled to a local temporary file (`Spool`) while a running SHA-256 and
byte count are kept; only a complete file is handed to `BlobStorage.put_file`, which makes it
visible atomically (a rename on disk; S3 objects appear only when their upload completes).
Training data is stored content-addressed (`blobs/sha256/ab/abcd…`), so identical content is
stored once whatever the number of files pointing at it.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from app.config import Settings, StorageBackend
from app.kit.errors import PayloadTooLarge

READ_CHUNK = 1024 * 1024


def blob_key(sha256: str) -> str:
    return f"blobs/sha256/{sha256[:2]}/{sha256}"


def part_key(upload_id: str, part_id: str) -> str:
    return f"uploads/{upload_id}/{part_id}"


class Spool:
    """A local temporary file that hashes and counts what is written, up to a byte limit.

    Over the limit it raises `PayloadTooLarge` and removes what it wrote. Always `discard()` or
    hand `path` to `BlobStorage.put_file` (which consumes it).
    """

    def __init__(
        self, directory: Path, limit: int, what: str = "file", param: str = "file"
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"{uuid.uuid4().hex}.part"
        self.limit = limit
        self.what = what
        self.param = param
        self.size = 0
        self._hash = hashlib.sha256()
        self._md5: Any = None
        self._file = self.path.open("wb", buffering=0)

    def track_md5(self) -> None:
        self._md5 = hashlib.md5(usedforsecurity=False)

    def write(self, data: bytes | memoryview) -> None:
        self.size += len(data)
        if self.size > self.limit:
            self.discard()
            raise PayloadTooLarge(
                f"The {self.what} is larger than the limit of {self.limit} bytes.",
                param=self.param,
            )
        self._file.write(data)
        self._hash.update(data)
        if self._md5 is not None:
            self._md5.update(data)

    def flush(self) -> None:
        """For writers that expect a file object; the data is flushed and synced on close."""

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()

    def discard(self) -> None:
        if not self._file.closed:
            self._file.close()
        self.path.unlink(missing_ok=True)

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    @property
    def md5(self) -> str | None:
        return None if self._md5 is None else str(self._md5.hexdigest())


class BlobStorage(ABC):
    """Where blobs live. Keys are relative paths such as `blobs/sha256/ab/abcd…`."""

    def __init__(self, spool_dir: Path) -> None:
        self.spool_dir = spool_dir

    def spool(self, limit: int, what: str = "file", param: str = "file") -> Spool:
        return Spool(self.spool_dir, limit, what, param)

    @abstractmethod
    async def put_file(self, key: str, source: Path) -> None:
        """Store the complete local file `source` under `key` atomically; `source` is consumed."""

    @abstractmethod
    async def exists(self, key: str) -> bool: ...

    @abstractmethod
    def read(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """Bytes `start` to `end` (exclusive; None = to the end), in chunks."""

    @abstractmethod
    async def delete(self, key: str) -> None:
        """Remove `key`; removing a missing key is not an error."""

    @abstractmethod
    def list_keys(self, prefix: str) -> AsyncIterator[tuple[str, datetime]]:
        """Every key under `prefix` with its last-modified time."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    @asynccontextmanager
    async def materialize(self, key: str) -> AsyncIterator[Path]:
        """A local path with the blob's content, for code that needs a real file (the
        validator, conversions). Remote backends copy it to a temporary file, removed after."""
        spool = self.spool(limit=2**63, what="copy")
        try:
            async for chunk in self.read(key):
                spool.write(chunk)
            spool.close()
            yield spool.path
        finally:
            spool.discard()

    def sweep_spool(self, older_than: datetime) -> int:
        """Remove spool files left by interrupted uploads (a killed process); returns how many."""
        removed = 0
        if not self.spool_dir.is_dir():
            return 0
        for path in self.spool_dir.glob("*.part"):
            try:
                modified = datetime.fromtimestamp(path.stat().st_mtime, UTC)
                if modified < older_than:
                    path.unlink(missing_ok=True)
                    removed += 1
            except FileNotFoundError:
                continue
        return removed


class LocalBlobStorage(BlobStorage):
    def __init__(self, root: Path, spool_dir: Path) -> None:
        super().__init__(spool_dir)
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(f"storage key escapes the storage root: {key!r}")
        return path

    async def put_file(self, key: str, source: Path) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        # Same filesystem as the spool directory: an atomic rename, the blob appears whole.
        os.replace(source, target)

    async def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    @asynccontextmanager
    async def materialize(self, key: str) -> AsyncIterator[Path]:
        # Blobs are immutable and content-addressed: the stored file itself can be read.
        yield self._path(key)

    async def read(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        path = self._path(key)
        handle = await asyncio.to_thread(path.open, "rb")
        try:
            handle.seek(start)
            remaining = None if end is None else max(0, end - start)
            while remaining is None or remaining > 0:
                size = READ_CHUNK if remaining is None else min(READ_CHUNK, remaining)
                chunk = await asyncio.to_thread(handle.read, size)
                if not chunk:
                    break
                if remaining is not None:
                    remaining -= len(chunk)
                yield chunk
        finally:
            handle.close()

    async def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        # Remove now-empty parent directories up to the root, so deleted uploads leave nothing.
        parent = path.parent
        while parent != self.root:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    async def list_keys(self, prefix: str) -> AsyncIterator[tuple[str, datetime]]:
        base = self._path(prefix)
        if not base.exists():
            return
        # Listed up front: callers may delete while they iterate.
        found = [path for path in base.rglob("*") if path.is_file()]
        for path in found:
            try:
                modified = datetime.fromtimestamp(path.stat().st_mtime, UTC)
            except FileNotFoundError:
                continue
            yield path.relative_to(self.root).as_posix(), modified


def make_storage(settings: Settings) -> BlobStorage:
    spool_dir = settings.data_dir / "tmp"
    if settings.storage.backend is StorageBackend.s3:
        from app.files.s3 import S3BlobStorage

        return S3BlobStorage(settings.storage, spool_dir)
    return LocalBlobStorage(settings.data_dir / "storage", spool_dir)
