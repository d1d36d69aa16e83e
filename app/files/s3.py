"""Blob storage in an S3-compatible bucket (AWS S3, MinIO, Ceph, R2, moto...).

boto3 is synchronous; every call runs in a worker thread (`asyncio.to_thread`) on one shared
client (boto3 clients are thread-safe). An object becomes visible only once its upload
completes, so `put_file` is atomic without a rename. Reads stream the object in chunks through
a ranged GetObject, so memory stays flat whatever the object size.

Credentials go to boto3 only: they never appear in exception messages or logs from here.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError

from app.config import StorageSettings
from app.files.storage import READ_CHUNK, BlobStorage

MULTIPART_BYTES = 16 * 1024 * 1024
TRANSFER_CONCURRENCY = 4
CONNECT_TIMEOUT_SECONDS = 10
READ_TIMEOUT_SECONDS = 60
# Shared by concurrent uploads (TRANSFER_CONCURRENCY connections each) and streaming reads.
MAX_POOL_CONNECTIONS = 32

_MISSING_CODES = frozenset({"404", "NoSuchKey", "NotFound"})
_INVALID_RANGE_CODES = frozenset({"416", "InvalidRange"})


def _error_code(error: ClientError) -> str:
    response: dict[str, Any] = getattr(error, "response", None) or {}
    code = response.get("Error", {}).get("Code")
    if code is None:
        code = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return str(code)


def _aware_utc(value: Any) -> datetime:
    if not isinstance(value, datetime):
        raise TypeError(f"unexpected LastModified value of type {type(value).__name__}")
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


class S3BlobStorage(BlobStorage):
    def __init__(self, settings: StorageSettings, spool_dir: Path) -> None:
        super().__init__(spool_dir)
        if not settings.s3_bucket:
            raise ValueError("the s3 storage backend needs a bucket (TUNEGATE_STORAGE__S3_BUCKET)")
        self.bucket: str = settings.s3_bucket
        self.prefix: str = settings.s3_prefix
        custom_endpoint = settings.s3_endpoint_url is not None
        options: dict[str, Any] = {
            "connect_timeout": CONNECT_TIMEOUT_SECONDS,
            "read_timeout": READ_TIMEOUT_SECONDS,
            "retries": {"mode": "standard"},
            "max_pool_connections": MAX_POOL_CONNECTIONS,
        }
        if custom_endpoint:
            # S3-compatible servers (MinIO, Ceph, moto...) are usually reached by a host name
            # that has no per-bucket subdomains, and not all of them accept the flexible
            # checksums newer boto3 versions send by default.
            options["s3"] = {"addressing_style": "path"}
            options["request_checksum_calculation"] = "when_required"
            options["response_checksum_validation"] = "when_required"
        credentials: dict[str, str] = {}
        if settings.s3_access_key_id is not None:
            credentials["aws_access_key_id"] = settings.s3_access_key_id.get_secret_value()
        if settings.s3_secret_access_key is not None:
            credentials["aws_secret_access_key"] = settings.s3_secret_access_key.get_secret_value()
        # A session of our own: the default session is not safe to create from several threads.
        session = boto3.session.Session()
        self._client: Any = session.client(
            "s3",
            endpoint_url=settings.s3_endpoint_url,
            region_name=settings.s3_region,
            config=Config(**options),
            **credentials,
        )
        self._transfer = TransferConfig(
            multipart_threshold=MULTIPART_BYTES,
            multipart_chunksize=MULTIPART_BYTES,
            max_concurrency=TRANSFER_CONCURRENCY,
        )

    def _key(self, key: str) -> str:
        return self.prefix + key

    async def put_file(self, key: str, source: Path) -> None:
        await asyncio.to_thread(self._upload, key, source)

    def _upload(self, key: str, source: Path) -> None:
        # On failure `source` is left in place (like the local backend) and the error re-raised;
        # the transfer manager aborts a failed multipart upload, so no partial object appears.
        self._client.upload_file(str(source), self.bucket, self._key(key), Config=self._transfer)
        source.unlink(missing_ok=True)

    async def exists(self, key: str) -> bool:
        try:
            await asyncio.to_thread(
                self._client.head_object, Bucket=self.bucket, Key=self._key(key)
            )
        except ClientError as error:
            if _error_code(error) in _MISSING_CODES:
                return False
            raise
        return True

    async def read(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        if start < 0 or (end is not None and end < 0):
            raise ValueError("byte positions must not be negative")
        if end is not None and end <= start:
            return
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": self._key(key)}
        if start > 0 or end is not None:
            last = "" if end is None else str(end - 1)
            params["Range"] = f"bytes={start}-{last}"
        try:
            response: dict[str, Any] = await asyncio.to_thread(self._client.get_object, **params)
        except ClientError as error:
            code = _error_code(error)
            if code in _INVALID_RANGE_CODES:
                return  # starts at or past the end of the object: no bytes, as on disk
            if code in _MISSING_CODES:
                raise FileNotFoundError(f"no blob stored under {key!r}") from None
            raise
        body: Any = response["Body"]
        try:
            while True:
                chunk: bytes = await asyncio.to_thread(body.read, READ_CHUNK)
                if not chunk:
                    break
                yield chunk
        finally:
            # Closes the connection without reading the rest of a partly consumed object.
            body.close()

    async def delete(self, key: str) -> None:
        # DeleteObject succeeds for a missing key.
        await asyncio.to_thread(self._client.delete_object, Bucket=self.bucket, Key=self._key(key))

    async def list_keys(self, prefix: str) -> AsyncIterator[tuple[str, datetime]]:
        # A prefix names a "directory", as on disk: `uploads/ab` does not list `uploads/abc/...`.
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        paginator: Any = self._client.get_paginator("list_objects_v2")
        pages = iter(paginator.paginate(Bucket=self.bucket, Prefix=self._key(prefix)))
        while True:
            page: dict[str, Any] | None = await asyncio.to_thread(next, pages, None)
            if page is None:
                return
            for item in page.get("Contents", []):
                full_key: str = item["Key"]
                yield full_key[len(self.prefix) :], _aware_utc(item["LastModified"])

    async def close(self) -> None:
        await asyncio.to_thread(self._client.close)
