"""The maintenance worker's round against the real database and storage."""

from __future__ import annotations

import os
import time
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from app.files.tasks import run_round
from app.kit.time import utcnow
from app.models import Blob, File, Job, Scope, Upload, UploadPart
from app.workers.runner import WorkerContext
from tests.conftest import make_settings


@pytest.fixture
async def api(client_for, factories):
    return client_for((await factories.key(scope=Scope.write)).key)


def context_for(app_factory, **files) -> WorkerContext:
    settings = make_settings(data_dir=app_factory.data_dir, files=files)
    return WorkerContext(settings, app_factory.database)


def storage_keys(app_factory, prefix: str) -> list[str]:
    root = app_factory.data_dir / "storage"
    base = root / prefix
    return (
        sorted(p.relative_to(root).as_posix() for p in base.rglob("*") if p.is_file())
        if base.exists()
        else []
    )


async def test_round_expires_uploads_and_purges_parts(api, app_factory, session) -> None:
    open_upload = (
        await api.post(
            "/v1/uploads",
            json={"filename": "a", "purpose": "fine-tune", "bytes": 10, "mime_type": "text/plain"},
        )
    ).json()
    stale = (
        await api.post(
            "/v1/uploads",
            json={"filename": "b", "purpose": "fine-tune", "bytes": 10, "mime_type": "text/plain"},
        )
    ).json()
    for upload in (open_upload, stale):
        response = await api.post(
            f"/v1/uploads/{upload['id']}/parts", files={"data": ("p", b"12345")}
        )
        assert response.status_code == 200
    await session.execute(
        update(Upload)
        .where(Upload.id == stale["id"])
        .values(expires_at=utcnow() - timedelta(seconds=1))
    )
    await session.commit()
    assert len(storage_keys(app_factory, "uploads")) == 2

    report = await run_round(context_for(app_factory), app_factory.storage())
    assert report is not None
    assert report.uploads_expired == 1 and report.uploads_purged == 1
    assert (await api.get(f"/v1/uploads/{stale['id']}")).json()["status"] == "expired"
    assert storage_keys(app_factory, f"uploads/{stale['id']}") == []
    assert len(storage_keys(app_factory, f"uploads/{open_upload['id']}")) == 1
    parts = (await session.scalars(select(UploadPart.upload_id))).all()
    assert stale["id"] not in parts and open_upload["id"] in parts


async def test_round_collects_unreferenced_blobs_after_the_grace_period(api, app_factory, session):
    kept = (
        await api.post(
            "/v1/files", files={"file": ("k.txt", b"keep me")}, data={"purpose": "user_data"}
        )
    ).json()
    gone = (
        await api.post(
            "/v1/files", files={"file": ("g.txt", b"delete me")}, data={"purpose": "user_data"}
        )
    ).json()
    assert (await api.delete(f"/v1/files/{gone['id']}")).status_code == 200
    assert len(storage_keys(app_factory, "blobs")) == 2

    # Within the grace period nothing is collected: an upload of the same content may be under way.
    report = await run_round(context_for(app_factory), app_factory.storage())
    assert report is not None and report.blobs_collected == 0
    assert len(storage_keys(app_factory, "blobs")) == 2

    report = await run_round(
        context_for(app_factory, blob_gc_grace=timedelta(0)), app_factory.storage()
    )
    assert report is not None and report.blobs_collected == 1
    assert storage_keys(app_factory, "blobs") == [
        f"blobs/sha256/{kept['sha256'][:2]}/{kept['sha256']}"
    ]
    remaining = (
        await session.scalars(select(Blob.sha256).execution_options(populate_existing=True))
    ).all()
    assert gone["sha256"] not in remaining and kept["sha256"] in remaining
    assert (await api.get(f"/v1/files/{kept['id']}/content")).content == b"keep me"
    # The same content uploaded again after collection is stored again.
    again = (
        await api.post(
            "/v1/files", files={"file": ("g.txt", b"delete me")}, data={"purpose": "user_data"}
        )
    ).json()
    assert (await api.get(f"/v1/files/{again['id']}/content")).content == b"delete me"


async def test_round_deletes_expired_files_and_old_spool_files(api, app_factory, session) -> None:
    made = (
        await api.post(
            "/v1/files", files={"file": ("e.txt", b"short-lived")}, data={"purpose": "batch"}
        )
    ).json()
    await session.execute(
        update(File).where(File.id == made["id"]).values(expires_at=utcnow() - timedelta(seconds=1))
    )
    await session.commit()
    spool = app_factory.data_dir / "tmp"
    spool.mkdir(parents=True, exist_ok=True)
    old, fresh = spool / "dead.part", spool / "live.part"
    old.write_bytes(b"x")
    fresh.write_bytes(b"y")
    two_hours_ago = time.time() - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))

    report = await run_round(context_for(app_factory), app_factory.storage())
    assert report is not None and report.files_expired == 1 and report.spool_files_removed == 1
    assert (await api.get(f"/v1/files/{made['id']}")).status_code == 404
    assert not old.exists() and fresh.exists()


async def test_only_one_replica_runs_a_round_at_a_time(app_factory, engine) -> None:
    from sqlalchemy import text

    from app.files.tasks import MAINTENANCE_LOCK_KEY

    async with engine.connect() as other_replica:
        await other_replica.execution_options(isolation_level="AUTOCOMMIT")
        assert await other_replica.scalar(
            text("SELECT pg_try_advisory_lock(:k)"), {"k": MAINTENANCE_LOCK_KEY}
        )
        try:
            assert await run_round(context_for(app_factory), app_factory.storage()) is None
        finally:
            await other_replica.execute(
                text("SELECT pg_advisory_unlock(:k)"), {"k": MAINTENANCE_LOCK_KEY}
            )
    assert await run_round(context_for(app_factory), app_factory.storage()) is not None


async def test_an_expired_file_an_unfinished_job_uses_stays_until_the_job_ends(
    api, app_factory, session
) -> None:
    made = (
        await api.post(
            "/v1/files", files={"file": ("t.jsonl", b'{"a": 1}\n')}, data={"purpose": "fine-tune"}
        )
    ).json()
    project_id = (await session.get(File, made["id"])).project_id
    job = Job(
        id="ftjob-expiry00000000000000001",
        project_id=project_id,
        provider="openai",
        model="gpt-4o-mini-2024-07-18",
        training_file=made["id"],
        method={"type": "supervised"},
        hyperparameters={},
        status="queued",
        result_files=[],
        submit_attempts=0,
    )
    session.add(job)
    await session.execute(
        update(File).where(File.id == made["id"]).values(expires_at=utcnow() - timedelta(seconds=1))
    )
    await session.commit()

    report = await run_round(context_for(app_factory), app_factory.storage())
    assert report is not None and report.files_expired == 0
    assert (await api.get(f"/v1/files/{made['id']}")).status_code == 200

    await session.execute(update(Job).where(Job.id == job.id).values(status="succeeded"))
    await session.commit()
    report = await run_round(context_for(app_factory), app_factory.storage())
    assert report is not None and report.files_expired == 1
    assert (await api.get(f"/v1/files/{made['id']}")).status_code == 404
