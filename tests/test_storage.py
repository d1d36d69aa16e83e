"""The same behavioural checks against every blob storage backend.

`local` is a directory; `s3` is `S3BlobStorage` talking to a real S3 API: moto's
`ThreadedMotoServer` on loopback, started once for this module, with a fresh bucket per test.

The moto server runs in a child process rather than a thread of this one: moto holds each object
whole in memory while serving it, and tracemalloc sees every thread of its process, so an
in-process server would make the flat-memory check of the client's reads measure moto instead.
"""

from __future__ import annotations

import hashlib
import os
import select
import subprocess
import sys
import tracemalloc
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
from pydantic import SecretStr

from app.config import StorageBackend, StorageSettings
from app.files.s3 import S3BlobStorage
from app.files.storage import BlobStorage, LocalBlobStorage
from app.kit.errors import PayloadTooLarge

MB = 1024 * 1024
REGION = "us-east-1"
DUMMY_CREDENTIAL = "testing"


MOTO_SERVER = """
import logging, sys
from moto.server import ThreadedMotoServer

logging.getLogger("werkzeug").setLevel(logging.WARNING)
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
host, port = server.get_host_and_port()
print(f"http://{host}:{port}", flush=True)
sys.stdin.read()  # serve until the test process closes our stdin, or exits
server.stop()
"""
SERVER_START_TIMEOUT = 30.0


@pytest.fixture(scope="module")
def moto_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log_path = tmp_path_factory.mktemp("moto") / "server.log"
    with log_path.open("wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-c", MOTO_SERVER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
        )
    assert server.stdin is not None and server.stdout is not None
    try:
        ready, _, _ = select.select([server.stdout], [], [], SERVER_START_TIMEOUT)
        endpoint = server.stdout.readline().decode().strip() if ready else ""
        if not endpoint.startswith("http://127.0.0.1:"):
            raise RuntimeError(f"moto server did not start: {log_path.read_text()[-2000:]}")
        yield endpoint
    finally:
        server.stdin.close()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        server.stdout.close()


@pytest.fixture(scope="module")
def s3_admin(moto_endpoint: str) -> Iterator[Any]:
    """A plain boto3 client for the test's own bucket housekeeping."""
    client = boto3.session.Session().client(
        "s3",
        endpoint_url=moto_endpoint,
        region_name=REGION,
        aws_access_key_id=DUMMY_CREDENTIAL,
        aws_secret_access_key=DUMMY_CREDENTIAL,
    )
    yield client
    client.close()


@pytest.fixture(params=["local", "s3"])
async def storage(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BlobStorage]:
    backend: BlobStorage
    if request.param == "local":
        backend = LocalBlobStorage(tmp_path / "storage", tmp_path / "tmp")
    else:
        endpoint: str = request.getfixturevalue("moto_endpoint")
        bucket = f"tunegate-test-{uuid.uuid4().hex[:12]}"
        request.getfixturevalue("s3_admin").create_bucket(Bucket=bucket)
        settings = StorageSettings(
            backend=StorageBackend.s3,
            s3_bucket=bucket,
            s3_prefix="tunegate/",
            s3_endpoint_url=endpoint,
            s3_region=REGION,
            s3_access_key_id=SecretStr(DUMMY_CREDENTIAL),
            s3_secret_access_key=SecretStr(DUMMY_CREDENTIAL),
        )
        backend = S3BlobStorage(settings, tmp_path / "tmp")
    try:
        yield backend
    finally:
        await backend.close()


async def _store(storage: BlobStorage, key: str, data: bytes) -> Path:
    spool = storage.spool(limit=len(data) + 1)
    spool.write(data)
    spool.close()
    assert spool.size == len(data)
    assert spool.sha256 == hashlib.sha256(data).hexdigest()
    await storage.put_file(key, spool.path)
    return spool.path


async def _read(storage: BlobStorage, key: str, start: int = 0, end: int | None = None) -> bytes:
    return b"".join([chunk async for chunk in storage.read(key, start, end)])


async def _keys(storage: BlobStorage, prefix: str) -> dict[str, datetime]:
    return {key: modified async for key, modified in storage.list_keys(prefix)}


async def test_put_exists_and_read_whole_and_ranges(storage: BlobStorage) -> None:
    data = os.urandom(3 * MB + 12345)  # several read chunks, not a multiple of the chunk size
    key = "blobs/sha256/ab/abcdef"
    assert not await storage.exists(key)

    spool_path = await _store(storage, key, data)

    assert not spool_path.exists()  # the spool file is consumed
    assert await storage.exists(key)
    assert await _read(storage, key) == data
    assert await _read(storage, key, start=1000) == data[1000:]
    assert await _read(storage, key, start=MB - 1, end=2 * MB + 7) == data[MB - 1 : 2 * MB + 7]
    assert await _read(storage, key, start=0, end=10) == data[:10]
    assert await _read(storage, key, start=len(data) - 5, end=len(data) + MB) == data[-5:]
    assert await _read(storage, key, start=10, end=10) == b""
    assert await _read(storage, key, start=len(data)) == b""


async def test_small_and_empty_blobs(storage: BlobStorage) -> None:
    await _store(storage, "small", b"hello")
    await _store(storage, "empty", b"")

    assert await _read(storage, "small") == b"hello"
    assert await _read(storage, "small", 1, 3) == b"el"
    assert await storage.exists("empty")
    assert await _read(storage, "empty") == b""


async def test_put_same_key_twice(storage: BlobStorage) -> None:
    key = "blobs/sha256/cd/cdef"
    first = await _store(storage, key, b"same content")
    second = await _store(storage, key, b"same content")

    assert not first.exists() and not second.exists()
    assert await _read(storage, key) == b"same content"


async def test_delete(storage: BlobStorage) -> None:
    await _store(storage, "uploads/u1/p1", b"part one")
    assert await storage.exists("uploads/u1/p1")

    await storage.delete("uploads/u1/p1")

    assert not await storage.exists("uploads/u1/p1")
    assert await _keys(storage, "uploads") == {}
    await storage.delete("uploads/u1/p1")  # already gone: fine
    await storage.delete("never/stored")


async def test_read_missing_key(storage: BlobStorage) -> None:
    with pytest.raises(FileNotFoundError):
        await _read(storage, "never/stored")


async def test_list_keys_by_prefix(storage: BlobStorage) -> None:
    before = datetime.now(UTC) - timedelta(minutes=5)
    await _store(storage, "uploads/u1/p1", b"1")
    await _store(storage, "uploads/u1/p2", b"22")
    await _store(storage, "uploads/u10/p1", b"not in u1")
    await _store(storage, "blobs/sha256/ab/abcd", b"blob")

    listed = await _keys(storage, "uploads/u1")

    assert set(listed) == {"uploads/u1/p1", "uploads/u1/p2"}
    for modified in listed.values():
        assert modified.utcoffset() == timedelta(0)
        assert before <= modified <= datetime.now(UTC) + timedelta(minutes=5)
    assert set(await _keys(storage, "uploads")) == {
        "uploads/u1/p1",
        "uploads/u1/p2",
        "uploads/u10/p1",
    }
    assert set(await _keys(storage, "blobs/")) == {"blobs/sha256/ab/abcd"}
    assert await _keys(storage, "missing") == {}


async def test_large_blob_round_trip_with_flat_memory(storage: BlobStorage) -> None:
    size = 40 * MB
    spool = storage.spool(limit=size)
    expected = hashlib.sha256()
    for _ in range(size // MB):
        block = os.urandom(MB)
        spool.write(block)
        expected.update(block)
    spool.close()
    assert spool.size == size
    assert spool.sha256 == expected.hexdigest()
    await storage.put_file("blobs/big", spool.path)
    assert not spool.path.exists()

    actual = hashlib.sha256()
    read = 0
    tracemalloc.start()
    try:
        async for chunk in storage.read("blobs/big"):
            actual.update(chunk)
            read += len(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert read == size
    assert actual.hexdigest() == expected.hexdigest()
    assert peak < 32 * MB, f"reading used {peak / MB:.1f} MB"


async def test_spool_refuses_past_its_limit(storage: BlobStorage) -> None:
    spool = storage.spool(limit=10, what="part")
    spool.write(b"0123456789")  # exactly the limit is fine
    assert spool.path.exists()

    with pytest.raises(PayloadTooLarge, match="part"):
        spool.write(b"x")

    assert not spool.path.exists()
    assert list(storage.spool_dir.glob("*.part")) == []
