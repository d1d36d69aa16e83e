"""Files and Uploads over HTTP, in-process: formats, retrieval, ranges, isolation, bad input."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from app.models import Scope
from tests.test_auth import assert_envelope

SEEDS = Path(__file__).parent / "fixtures" / "seeds"
SEED_FORMATS = {
    "sentiment_simple_zh.csv": ("csv", 14),
    "fund_qa_zh.jsonl": ("prompt_completion", 3),
    "fund_qa_zh_prepared.jsonl": ("prompt_completion", 3),
    "airport_ru.jsonl": ("chat", None),
    "marv_en.jsonl": ("chat", 3),
    "gemini_contents.jsonl": ("gemini", None),
    "gemini_input_output.jsonl": ("vertex_text", None),
}


@pytest.fixture
async def writer(client_for, factories):
    return client_for((await factories.key(scope=Scope.write)).key)


def stored_blobs(app_factory) -> list[Path]:
    root = app_factory.data_dir / "storage" / "blobs"
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def spool_files(app_factory) -> list[Path]:
    root = app_factory.data_dir / "tmp"
    return list(root.glob("*")) if root.exists() else []


async def upload(client, content: bytes, filename: str = "train.jsonl", purpose: str = "fine-tune"):
    return await client.post(
        "/v1/files", files={"file": (filename, content)}, data={"purpose": purpose}
    )


@pytest.mark.parametrize("name", sorted(SEED_FORMATS))
async def test_every_seed_format_is_detected(writer, name: str) -> None:
    content = (SEEDS / name).read_bytes()
    response = await upload(writer, content, filename=name)
    assert response.status_code == 200, response.text
    body = response.json()
    expected_format, expected_examples = SEED_FORMATS[name]
    assert body["object"] == "file" and body["id"].startswith("file-")
    assert body["format"] == expected_format, body["format_reason"]
    assert body["format_reason"] is None
    if expected_examples is not None:
        assert body["examples"] == expected_examples
    else:
        assert body["examples"] == sum(1 for line in content.splitlines() if line.strip())
    assert body["bytes"] == len(content)
    assert body["sha256"] == hashlib.sha256(content).hexdigest()
    assert body["filename"] == name and body["purpose"] == "fine-tune"
    assert body["status"] == "processed"


async def test_retrieve_list_content_and_delete(writer, app_factory) -> None:
    chat = (SEEDS / "marv_en.jsonl").read_bytes()
    first = (await upload(writer, chat, "a.jsonl")).json()
    second = (
        await upload(writer, b'{"prompt": "x", "completion": "y"}\n', "b.jsonl", "batch")
    ).json()

    assert (await writer.get(f"/v1/files/{first['id']}")).json() == first
    listed = (await writer.get("/v1/files")).json()
    assert [f["id"] for f in listed["data"]] == [second["id"], first["id"]]
    assert listed["has_more"] is False
    only_tune = (await writer.get("/v1/files", params={"purpose": "fine-tune"})).json()
    assert [f["id"] for f in only_tune["data"]] == [first["id"]]
    page = (await writer.get("/v1/files", params={"limit": 1, "order": "asc"})).json()
    assert [f["id"] for f in page["data"]] == [first["id"]] and page["has_more"] is True

    content = await writer.get(f"/v1/files/{first['id']}/content")
    assert content.status_code == 200 and content.content == chat
    assert content.headers["content-length"] == str(len(chat))

    deleted = await writer.delete(f"/v1/files/{first['id']}")
    assert deleted.json() == {"id": first["id"], "object": "file", "deleted": True}
    assert_envelope(await writer.get(f"/v1/files/{first['id']}"), 404)
    assert_envelope(await writer.get(f"/v1/files/{first['id']}/content"), 404)
    assert_envelope(await writer.delete(f"/v1/files/{first['id']}"), 404)


async def test_range_requests(writer) -> None:
    content = bytes(range(256)) * 40
    file_id = (await upload(writer, content, "bin.dat")).json()["id"]
    url = f"/v1/files/{file_id}/content"

    middle = await writer.get(url, headers={"Range": "bytes=10-19"})
    assert middle.status_code == 206 and middle.content == content[10:20]
    assert middle.headers["content-range"] == f"bytes 10-19/{len(content)}"
    tail = await writer.get(url, headers={"Range": "bytes=-5"})
    assert tail.status_code == 206 and tail.content == content[-5:]
    open_ended = await writer.get(url, headers={"Range": "bytes=10000-"})
    assert open_ended.content == content[10000:]
    clipped = await writer.get(url, headers={"Range": f"bytes=0-{len(content) * 2}"})
    assert clipped.status_code == 206 and clipped.content == content
    outside = await writer.get(url, headers={"Range": f"bytes={len(content)}-"})
    assert_envelope(outside, 416)
    assert outside.headers["content-range"] == f"bytes */{len(content)}"
    empty_suffix = await writer.get(url, headers={"Range": "bytes=-0"})
    assert_envelope(empty_suffix, 416)
    assert empty_suffix.headers["content-range"] == f"bytes */{len(content)}"
    ignored = await writer.get(url, headers={"Range": "bytes=0-1,5-6"})
    assert ignored.status_code == 200 and ignored.content == content


async def test_another_projects_file_is_404_everywhere(client_for, factories, writer) -> None:
    file_id = (await upload(writer, b'{"messages": []}\n')).json()["id"]
    stranger = client_for((await factories.key(scope=Scope.admin)).key)
    assert_envelope(await stranger.get(f"/v1/files/{file_id}"), 404)
    assert_envelope(await stranger.get(f"/v1/files/{file_id}/content"), 404)
    assert_envelope(await stranger.delete(f"/v1/files/{file_id}"), 404)
    assert (await stranger.get("/v1/files")).json()["data"] == []
    assert_envelope(await stranger.get("/v1/files", params={"after": file_id}), 404)
    # ... and it is still there for its owner.
    assert (await writer.get(f"/v1/files/{file_id}")).status_code == 200


async def test_read_key_cannot_upload_or_delete(client_for, factories, writer) -> None:
    file_id = (await upload(writer, b"x")).json()["id"]
    creds = await factories.key(scope=Scope.read)
    # A read key of another project: 404 on read, 403 on writes (scope is checked first).
    reader = client_for(creds.key)
    assert_envelope(await upload(reader, b"x"), 403)
    assert_envelope(await reader.delete(f"/v1/files/{file_id}"), 403)


async def test_identical_content_is_stored_once(writer, app_factory) -> None:
    content = (SEEDS / "airport_ru.jsonl").read_bytes()
    a = (await upload(writer, content, "one.jsonl")).json()
    b = (await upload(writer, content, "two.jsonl")).json()
    assert a["id"] != b["id"] and a["sha256"] == b["sha256"]
    assert len(stored_blobs(app_factory)) == 1
    await writer.delete(f"/v1/files/{a['id']}")
    assert (await writer.get(f"/v1/files/{b['id']}/content")).content == content


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("../../etc/passwd", "passwd"),
        ("..\\..\\windows\\win.ini", "win.ini"),
        ("bad\x1bna\x7fme\r\n.jsonl", "badname.jsonl"),
        ('quo"te.jsonl', 'quo"te.jsonl'),
        ("..", "upload"),
        ("x" * 400 + ".jsonl", "x" * 249 + ".jsonl"),
        ("日本語 データ.jsonl", "日本語 データ.jsonl"),
    ],
)
async def test_filenames_are_stored_sanitised(writer, raw: str, shown: str) -> None:
    response = await upload(writer, b'{"prompt": "a", "completion": "b"}\n', raw)
    assert response.status_code == 200, response.text
    assert response.json()["filename"] == shown


async def test_raw_control_characters_in_a_filename(writer) -> None:
    boundary = "b0undary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a\x00b\x07c.txt"'
        f"\r\n\r\nhello\r\n--{boundary}--\r\n"
    ).encode()
    response = await writer.post(
        "/v1/files",
        content=body,
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
    )
    assert response.status_code == 200, response.text
    assert response.json()["filename"] == "abc.txt"


async def test_binary_and_non_utf8_content_is_stored_as_unknown(writer) -> None:
    junk = bytes(range(256)) * 4
    body = (await upload(writer, junk, "junk.bin")).json()
    assert body["format"] == "unknown" and body["format_reason"]
    latin1 = "prompt,completion\ncafé,1\n".encode("latin-1")
    body = (await upload(writer, latin1, "data.csv")).json()
    assert body["format"] == "unknown" and "UTF-8" in body["format_reason"]


async def test_bad_uploads_are_refused_and_leave_nothing(writer, app_factory) -> None:
    assert_envelope(
        await writer.post("/v1/files", data={"purpose": "fine-tune"}, files={"other": ("a", b"x")}),
        422,
    )
    error = assert_envelope(await writer.post("/v1/files", files={"file": ("a.jsonl", b"x")}), 422)
    assert error["param"] == "purpose"
    error = assert_envelope(await upload(writer, b"x", purpose="world-domination"), 422)
    assert error["param"] == "purpose" and "fine-tune" in error["message"]
    error = assert_envelope(await upload(writer, b""), 400)
    assert "empty" in error["message"]
    assert_envelope(
        await writer.post(
            "/v1/files", content=b'{"file": 1}', headers={"content-type": "application/json"}
        ),
        415,
    )
    assert_envelope(
        await writer.post(
            "/v1/files",
            files={"file": ("a", b"x")},
            data={"purpose": "fine-tune", "surprise": "1"},
        ),
        422,
    )
    assert (await writer.get("/v1/files")).json()["data"] == []
    assert stored_blobs(app_factory) == [] and spool_files(app_factory) == []


async def test_multipart_cut_off_midway_stores_nothing(writer, app_factory) -> None:
    boundary = "tunegate-boundary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode() + b'{"messages": []}\n' * 1000  # no closing boundary
    response = await writer.post(
        "/v1/files",
        content=body,
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
    )
    error = assert_envelope(response, 400)
    assert "closing boundary" in error["message"]
    assert (await writer.get("/v1/files")).json()["data"] == []
    assert stored_blobs(app_factory) == [] and spool_files(app_factory) == []


async def test_file_over_the_limit_is_413_and_removed(app_factory, client_for, factories) -> None:
    small = app_factory(files={"max_file_bytes": 10_000})
    api = client_for((await factories.key(scope=Scope.write)).key, target=small)
    error = assert_envelope(await upload(api, b"a" * 20_000), 413)
    assert "10000" in error["message"]
    assert spool_files(app_factory) == [] and stored_blobs(app_factory) == []
    assert (await upload(api, b"a" * 9_000)).status_code == 200


async def test_expires_after_sets_expires_at(writer) -> None:
    response = await writer.post(
        "/v1/files",
        files={"file": ("a.jsonl", b"x")},
        data={
            "purpose": "batch",
            "expires_after[anchor]": "created_at",
            "expires_after[seconds]": "3600",
        },
    )
    body = response.json()
    assert body["expires_at"] == body["created_at"] + 3600
    bad = await writer.post(
        "/v1/files",
        files={"file": ("a.jsonl", b"x")},
        data={
            "purpose": "batch",
            "expires_after[anchor]": "created_at",
            "expires_after[seconds]": "5",
        },
    )
    assert_envelope(bad, 422)


# --- Uploads ------------------------------------------------------------------------------------


async def start_upload(client, size: int, filename: str = "big.jsonl") -> dict:
    response = await client.post(
        "/v1/uploads",
        json={
            "filename": filename,
            "purpose": "fine-tune",
            "bytes": size,
            "mime_type": "text/jsonl",
        },
    )
    assert response.status_code == 200, response.text
    return response.json()


async def add_part(client, upload_id: str, data: bytes):
    return await client.post(f"/v1/uploads/{upload_id}/parts", files={"data": ("blob", data)})


async def test_upload_parts_complete_in_listed_order(writer) -> None:
    line = (
        '{"messages": [{"role": "user", "content": "%s"}, '
        '{"role": "assistant", "content": "ok"}]}\n'
    )
    a, b, c = [(line % word).encode() for word in ("one", "two", "three")]
    created = await start_upload(writer, len(a + b + c))
    assert created["status"] == "pending" and created["object"] == "upload"
    assert created["expires_at"] == created["created_at"] + 3600
    ids = {}
    for name, data in (("c", c), ("a", a), ("b", b)):  # sent out of order
        part = await add_part(writer, created["id"], data)
        assert part.status_code == 200, part.text
        assert part.json()["object"] == "upload.part"
        ids[name] = part.json()["id"]
    md5 = hashlib.md5(a + b + c).hexdigest()
    done = await writer.post(
        f"/v1/uploads/{created['id']}/complete",
        json={"part_ids": [ids["a"], ids["b"], ids["c"]], "md5": md5},
    )
    assert done.status_code == 200, done.text
    body = done.json()
    assert body["status"] == "completed" and body["file"]["bytes"] == len(a + b + c)
    assert body["file"]["format"] == "chat" and body["file"]["examples"] == 3
    content = await writer.get(f"/v1/files/{body['file']['id']}/content")
    assert content.content == a + b + c
    assert_envelope(
        await writer.post(f"/v1/uploads/{created['id']}/complete", json={"part_ids": [ids["a"]]}),
        409,
    )
    assert_envelope(await add_part(writer, created["id"], b"more"), 409)


async def test_upload_part_errors(writer, client_for, factories) -> None:
    created = await start_upload(writer, 10)
    upload_id = created["id"]
    p1 = (await add_part(writer, upload_id, b"12345")).json()["id"]
    error = assert_envelope(await add_part(writer, upload_id, b"1234567"), 400)
    assert "over the 10 declared" in error["message"]
    p2 = (await add_part(writer, upload_id, b"678")).json()["id"]

    complete = f"/v1/uploads/{upload_id}/complete"
    error = assert_envelope(await writer.post(complete, json={"part_ids": [p1, p1]}), 422)
    assert "more than once" in error["message"]
    error = assert_envelope(await writer.post(complete, json={"part_ids": [p1, "part_nope"]}), 422)
    assert "part_nope" in error["message"]
    error = assert_envelope(await writer.post(complete, json={"part_ids": [p1, p2]}), 400)
    assert "8 bytes" in error["message"]
    p3 = (await add_part(writer, upload_id, b"90")).json()["id"]
    error = assert_envelope(
        await writer.post(complete, json={"part_ids": [p1, p2, p3], "md5": "0" * 32}), 400
    )
    assert error["code"] == "md5_mismatch"

    stranger = client_for((await factories.key(scope=Scope.write)).key)
    assert_envelope(await stranger.post(complete, json={"part_ids": [p1, p2, p3]}), 404)
    assert_envelope(await add_part(stranger, upload_id, b"x"), 404)
    assert_envelope(await stranger.post(f"/v1/uploads/{upload_id}/cancel"), 404)

    done = await writer.post(complete, json={"part_ids": [p1, p2, p3]})
    assert done.status_code == 200, done.text
    assert (
        await writer.get(f"/v1/files/{done.json()['file']['id']}/content")
    ).content == b"1234567890"


async def test_upload_create_errors_and_cancel(writer, app_factory, client_for, factories) -> None:
    too_big = await writer.post(
        "/v1/uploads",
        json={
            "filename": "x",
            "purpose": "fine-tune",
            "bytes": 9 * 1024**3,
            "mime_type": "text/jsonl",
        },
    )
    assert assert_envelope(too_big, 422)["param"] == "bytes"
    assert_envelope(
        await writer.post(
            "/v1/uploads", json={"filename": "x", "purpose": "nope", "bytes": 1, "mime_type": "a"}
        ),
        422,
    )
    created = await start_upload(writer, 100)
    cancelled = await writer.post(f"/v1/uploads/{created['id']}/cancel")
    assert cancelled.json()["status"] == "cancelled"
    assert_envelope(await add_part(writer, created["id"], b"x"), 409)
    assert_envelope(
        await writer.post(f"/v1/uploads/{created['id']}/complete", json={"part_ids": ["part_x"]}),
        409,
    )

    small_parts = app_factory(files={"max_part_bytes": 1000})
    api = client_for((await factories.key(scope=Scope.write)).key, target=small_parts)
    big = await start_upload(api, 5000)
    assert_envelope(await add_part(api, big["id"], b"a" * 1500), 413)
    assert spool_files(app_factory) == []


async def test_range_with_absurd_numbers_is_ignored_not_500(writer) -> None:
    file_id = (await upload(writer, b"0123456789", "r.txt")).json()["id"]
    response = await writer.get(
        f"/v1/files/{file_id}/content", headers={"Range": "bytes=0-1" + "0" * 5000}
    )
    assert response.status_code == 200 and response.content == b"0123456789"


async def test_upload_types_are_strict_and_part_limit_names_data(writer) -> None:
    for bad in (True, "5", 5.5):
        response = await writer.post(
            "/v1/uploads",
            json={"filename": "x", "purpose": "fine-tune", "bytes": bad, "mime_type": "a"},
        )
        assert_envelope(response, 422)
    created = await start_upload(writer, 5)
    error = assert_envelope(await add_part(writer, created["id"], b"123456"), 413)
    assert error["param"] == "data"


async def test_upload_expires_after_applies_to_the_completed_file(writer) -> None:
    response = await writer.post(
        "/v1/uploads",
        json={
            "filename": "e.jsonl",
            "purpose": "batch",
            "bytes": 3,
            "mime_type": "text/jsonl",
            "expires_after": {"anchor": "created_at", "seconds": 7200},
        },
    )
    upload_id = response.json()["id"]
    part = (await add_part(writer, upload_id, b"abc")).json()["id"]
    done = (
        await writer.post(f"/v1/uploads/{upload_id}/complete", json={"part_ids": [part]})
    ).json()
    file = done["file"]
    assert file["expires_at"] is not None
    assert 7190 <= file["expires_at"] - file["created_at"] <= 7210


async def test_deleting_a_file_restarts_its_blobs_grace_period(writer, session) -> None:
    from sqlalchemy import select, update

    from app.models import Blob

    made = (await upload(writer, b"graceful", "g.txt", "batch")).json()
    old = utcnow_minus_hours(3)
    await session.execute(
        update(Blob).where(Blob.sha256 == made["sha256"]).values(last_seen_at=old)
    )
    await session.commit()
    await writer.delete(f"/v1/files/{made['id']}")
    seen = await session.scalar(
        select(Blob.last_seen_at)
        .where(Blob.sha256 == made["sha256"])
        .execution_options(populate_existing=True)
    )
    assert seen is not None and seen > old


def utcnow_minus_hours(hours: int):
    from datetime import timedelta

    from app.kit.time import utcnow

    return utcnow() - timedelta(hours=hours)
