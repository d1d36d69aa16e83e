"""The official `openai` SDK against `tunegate serve` on loopback: Files and Uploads."""

from __future__ import annotations

import hashlib
import os
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from tests.server import RunningServer, start_server

pytestmark = pytest.mark.slow

SEEDS = Path(__file__).parent / "fixtures" / "seeds"
ADMIN_KEY = "tg-sdkfiles01-0123456789abcdefghijklmnopqrstuvwxyzABCD"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = start_server(
        tmp_path_factory.mktemp("sdk-files"), TUNEGATE_BOOTSTRAP_ADMIN_KEY=ADMIN_KEY
    )
    yield running
    assert running.stop() == 0


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=ADMIN_KEY, max_retries=0)


def blob_files(server: RunningServer) -> list[Path]:
    root = server.data_dir / "storage" / "blobs"
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("sentiment_simple_zh.csv", "csv"),
        ("fund_qa_zh.jsonl", "prompt_completion"),
        ("fund_qa_zh_prepared.jsonl", "prompt_completion"),
        ("airport_ru.jsonl", "chat"),
        ("marv_en.jsonl", "chat"),
        ("gemini_contents.jsonl", "gemini"),
        ("gemini_input_output.jsonl", "vertex_text"),
    ],
)
def test_seed_uploads_through_the_sdk(client: openai.OpenAI, name: str, expected: str) -> None:
    with (SEEDS / name).open("rb") as handle:
        created = client.files.create(file=handle, purpose="fine-tune")
    assert created.object == "file" and created.filename == name
    assert created.purpose == "fine-tune" and created.status == "processed"
    assert created.model_extra is not None and created.model_extra["format"] == expected
    assert client.files.retrieve(created.id).id == created.id
    assert client.files.content(created.id).read() == (SEEDS / name).read_bytes()


def test_list_autopaginates_and_delete(client: openai.OpenAI) -> None:
    made = [
        client.files.create(
            file=(f"page{i}.jsonl", b'{"prompt": "p", "completion": "c"}\n'), purpose="batch"
        ).id
        for i in range(5)
    ]
    seen = [f.id for f in client.files.list(purpose="batch", limit=2)]
    assert seen[:5] == list(reversed(made))
    deleted = client.files.delete(made[0])
    assert deleted.deleted is True and deleted.id == made[0]
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(made[0])
    with pytest.raises(openai.NotFoundError):
        client.files.content(made[0])


def test_sdk_error_classes(client: openai.OpenAI, server: RunningServer) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as bad_purpose:
        client.files.create(file=("a.jsonl", b"x"), purpose="nonsense")  # type: ignore[arg-type]
    assert bad_purpose.value.body["param"] == "purpose"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        client.files.create(file=("a.jsonl", b""), purpose="fine-tune")
    anonymous = openai.OpenAI(
        base_url=f"{server.base_url}/v1", api_key="tg-wrong-key-123", max_retries=0
    )
    with pytest.raises(openai.AuthenticationError):
        anonymous.files.list()


def test_chunked_upload_of_100_mb_matches_byte_for_byte(
    client: openai.OpenAI, tmp_path: Path
) -> None:
    path = tmp_path / "big.jsonl"
    line = (
        b'{"messages": [{"role": "user", "content": "hello %d"}, '
        b'{"role": "assistant", "content": "hi"}]}\n'
    )
    digest = hashlib.sha256()
    with path.open("wb") as handle:
        i = 0
        while handle.tell() < 100 * 1024 * 1024:
            chunk = b"".join(line.replace(b"%d", str(i + k).encode()) for k in range(1000))
            handle.write(chunk)
            digest.update(chunk)
            i += 1000
    size = path.stat().st_size
    md5 = hashlib.md5(path.read_bytes()).hexdigest()
    upload = client.uploads.upload_file_chunked(
        file=path, mime_type="text/jsonl", purpose="fine-tune", md5=md5
    )
    assert upload.status == "completed" and upload.file is not None
    assert upload.file.bytes == size
    streamed = hashlib.sha256()
    with client.files.with_streaming_response.content(upload.file.id) as response:
        for chunk in response.iter_bytes():
            streamed.update(chunk)
    assert streamed.hexdigest() == digest.hexdigest()
    assert upload.file.model_extra is not None and upload.file.model_extra["examples"] == i


def test_same_content_at_the_same_moment_gives_two_files_one_blob(
    client: openai.OpenAI, server: RunningServer
) -> None:
    content = os.urandom(4 * 1024 * 1024)
    before = len(blob_files(server))
    with ThreadPoolExecutor(max_workers=4) as pool:
        files = list(
            pool.map(
                lambda i: client.files.create(file=(f"same{i}.bin", content), purpose="user_data"),
                range(4),
            )
        )
    assert len({f.id for f in files}) == 4
    assert len({f.model_extra["sha256"] for f in files if f.model_extra}) == 1
    assert len(blob_files(server)) == before + 1
    for f in files:
        assert client.files.content(f.id).read() == content


def test_client_disconnect_mid_upload_stores_nothing(
    client: openai.OpenAI, server: RunningServer
) -> None:
    files_before = [f.id for f in client.files.list()]
    host, port = server.base_url.removeprefix("http://").split(":")
    boundary = "cut-off-boundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="cut.jsonl"\r\n\r\n'
    ).encode()
    declared = len(head) + 50 * 1024 * 1024
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            (
                f"POST /v1/files HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {ADMIN_KEY}\r\n"
                f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
                f"Content-Length: {declared}\r\n\r\n"
            ).encode()
            + head
        )
        for _ in range(64):
            sock.sendall(b"x" * 65536)
    spool = server.data_dir / "tmp"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and spool.exists() and any(spool.iterdir()):
        time.sleep(0.1)
    assert not spool.exists() or not any(spool.iterdir()), "a partial upload was left behind"
    assert [f.id for f in client.files.list()] == files_before


def test_cli_upload_and_list(server: RunningServer) -> None:
    auth = ("--api-key", ADMIN_KEY, "--base-url", server.base_url)
    uploaded = server.cli("files", "upload", str(SEEDS / "marv_en.jsonl"), *auth)
    assert uploaded.returncode == 0, uploaded.stderr
    file_id = uploaded.stdout.strip()
    assert file_id.startswith("file-")
    assert "format chat, 3 examples" in uploaded.stderr
    listed = server.cli("files", "list", "--purpose", "fine-tune", *auth)
    assert listed.returncode == 0, listed.stderr
    assert file_id in listed.stdout
    refused = server.cli(
        "files",
        "upload",
        str(SEEDS / "marv_en.jsonl"),
        "--api-key",
        "tg-nope-nope-nope",
        "--base-url",
        server.base_url,
    )
    assert refused.returncode == 1 and "Incorrect API key" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_cli_client_switches_to_the_uploads_api_for_big_files(
    server: RunningServer, tmp_path: Path
) -> None:
    from app.files.client import TunegateClient

    path = tmp_path / "parts.jsonl"
    path.write_bytes(b'{"prompt": "p", "completion": "c"}\n' * 30_000)  # ~1 MB
    seen: list[int] = []
    client = TunegateClient(server.base_url, ADMIN_KEY)
    try:
        created = client.upload(
            path, "fine-tune", seen.append, single_request_limit=100_000, part_size=300_000
        )
    finally:
        client.close()
    assert sum(seen) == path.stat().st_size
    assert created["bytes"] == path.stat().st_size and created["examples"] == 30_000
    sdk = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=ADMIN_KEY)
    assert sdk.files.content(created["id"]).read() == path.read_bytes()
