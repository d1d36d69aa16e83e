"""The `trainer` worker role: runs queued `local` jobs on this machine, one at a time.

Loop: claim the oldest local job that is `queued` (new, or resumed after a pause), or `running`
with an expired lease (its trainer died), with `FOR UPDATE SKIP LOCKED` and a lease
(`TUNEGATE_LOCAL__LEASE`); commit; train it in a worker thread (engine.train) while this
coroutine, every step report or two seconds, writes the reports (metrics events and rows,
checkpoints with their adapters as blobs, `fine_tuning.job.checkpoint.created` webhooks),
renews the lease and reads the job's status. A cancel or pause seen there stops the training
after the step under way (the thread checks a flag between steps); a pause keeps the job's
checkpoints, and the resume continues from the last one. A trainer whose process dies leaves its
lease to expire; the next trainer resumes the job from its last checkpoint, and after
`TUNEGATE_LOCAL__MAX_ATTEMPTS` such deaths the job fails with `trainer_lost` instead of running
forever. A trainer stopping gracefully (shutdown) hands the job back at once.

Every write happens only while the lease is still ours, so two trainers never write one job.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import math
import threading
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.files.service import FilesContext, file_from_bytes
from app.files.storage import BlobStorage, blob_key, make_storage
from app.jobs import state
from app.jobs.repository import SyncWriter
from app.jobs.schemas import JobCheckpointObject
from app.kit.ids import new_id
from app.kit.logging import get_logger
from app.kit.time import utcnow
from app.models import File, Job, JobCheckpoint, JobMetric
from app.providers.local import engine, models
from app.providers.local.provider import (
    adapter_key,
    device_for,
    get_bytes,
    put_bytes,
    state_key,
)
from app.validation.cost import epochs_for
from app.webhooks.events import emit
from app.workers.runner import WorkerContext, register_role, take_work_until_stopped

log = get_logger("tunegate.local.trainer")

ROLE = "trainer"
RESULT_PURPOSE = "fine-tune-results"
# How often the trainer writes reports, renews its lease and looks at the job's status, at
# least (a finished step wakes it at once): a cancel or pause reaches the training thread well
# within the step under way.
CHECK_SECONDS = 0.25
# LoRA defaults (tunegate extensions of OpenAI's hyperparameters).
LORA_DEFAULTS: dict[str, Any] = {"lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0}
# "auto" batch size: half the examples, at most this (padded batches cost little on a CPU and
# fewer, larger steps learn the small sets people start with in the same number of epochs).
MAX_AUTO_BATCH = 8


@dataclass
class _Claim:
    job_id: str
    project_id: str
    lease: datetime
    base: engine.BaseModelSource
    fine_tuned_model: str
    hyperparameters: dict[str, Any]
    seed: int
    training: str  # blob keys
    validation: str | None
    resume_step: int | None  # the checkpoint to resume from


@dataclass
class _Progress:
    """Reports from the training thread, handed to the event loop in order."""

    queue: asyncio.Queue[engine.StepReport | engine.EpochReport]
    stop_reason: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


def resolve_hyperparameters(
    given: dict[str, Any], examples: int, base_learning_rate: float
) -> dict[str, Any]:
    """OpenAI's hyperparameters with "auto" replaced by the values the trainer uses."""
    values = {**LORA_DEFAULTS, **{k: v for k, v in given.items() if v is not None}}
    n_epochs = values.get("n_epochs")
    values["n_epochs"] = epochs_for(examples, n_epochs if isinstance(n_epochs, int) else None)[0]
    if not isinstance(values.get("batch_size"), int):
        values["batch_size"] = max(1, min(MAX_AUTO_BATCH, math.ceil(examples / 2)))
    if not isinstance(values.get("learning_rate_multiplier"), int | float):
        values["learning_rate_multiplier"] = 1.0
    values["learning_rate"] = base_learning_rate * float(values["learning_rate_multiplier"])
    values.pop("beta", None)
    return values


async def trainer_loop(worker: WorkerContext, stop: asyncio.Event) -> None:
    settings = worker.settings
    if not models.enabled(settings):
        log.info("local provider disabled or not installed; the trainer role is idle")
        await stop.wait()
        return
    models.register(settings)
    storage = make_storage(settings)
    poll = settings.local.poll_interval.total_seconds()

    async def train_one() -> bool:
        claim = await _claim(worker)
        if claim is not None:
            await _Run(worker, storage, claim, stop).run()
        return claim is not None

    try:
        await take_work_until_stopped(stop, poll, train_one)
    finally:
        await storage.close()


async def _claim(worker: WorkerContext) -> _Claim | None:
    settings = worker.settings.local
    now = utcnow()
    lease = now + settings.lease
    async with worker.database.sessionmaker() as session, session.begin():
        job: Job | None = await session.scalar(
            select(Job)
            .where(
                Job.provider == models.PROVIDER,
                Job.status.in_(("validating_files", "queued", "running")),
                (Job.lease_until.is_(None)) | (Job.lease_until < now),
                (Job.next_attempt_at.is_(None)) | (Job.next_attempt_at <= now),
            )
            .order_by(Job.created_at)
            .limit(1)
            .with_for_update(skip_locked=True)
        )
        if job is None:
            return None
        job.lease_until = lease
        taken_over = job.status == "running"
        if taken_over:
            job.submit_attempts += 1
            if job.submit_attempts > settings.max_attempts:
                await state.transition(
                    session,
                    job,
                    "failed",
                    error={
                        "code": "trainer_lost",
                        "message": f"The trainer running this job stopped {settings.max_attempts}"
                        " times without finishing it (killed, or out of memory?).",
                        "param": None,
                    },
                )
                job.lease_until = None
                return None
        base = models.source_for(job.model)
        if base is None:
            await state.transition(
                session,
                job,
                "failed",
                error={
                    "code": "model_not_available",
                    "message": f"The base model {job.model} is not installed on this trainer.",
                    "param": "model",
                },
            )
            job.lease_until = None
            return None
        training = await session.get(File, job.training_file)
        validation = await session.get(File, job.validation_file) if job.validation_file else None
        if training is None or (job.validation_file and validation is None):
            await state.transition(
                session,
                job,
                "failed",
                error={
                    "code": "invalid_training_file",
                    "message": "The job's training or validation file was deleted.",
                    "param": "training_file",
                },
            )
            job.lease_until = None
            return None
        resume_step: int | None = await session.scalar(
            select(JobCheckpoint.step_number)
            .where(JobCheckpoint.job_id == job.id)
            .order_by(JobCheckpoint.step_number.desc())
            .limit(1)
        )
        if job.submitted_at is None:
            job.submitted_at = now
        name = f"ft:{base.id}:{job.project_id}:{job.suffix or ''}:{job.id}"
        if taken_over:
            state.add_event(
                session,
                job,
                "The trainer running this job stopped; resuming "
                + (
                    f"from the checkpoint at step {resume_step}."
                    if resume_step
                    else "from the start."
                ),
                level="warn",
            )
        else:
            if job.status == "validating_files":
                await state.transition(session, job, "queued")
            if resume_step is not None:  # resumed after a pause
                state.add_event(
                    session, job, f"Resuming from the checkpoint at step {resume_step}."
                )
        claim = _Claim(
            job_id=job.id,
            project_id=job.project_id,
            lease=lease,
            base=base,
            fine_tuned_model=name,
            hyperparameters=dict(job.hyperparameters or {}),
            seed=int(job.seed or 0),
            training=blob_key(training.sha256),
            validation=blob_key(validation.sha256) if validation is not None else None,
            resume_step=resume_step,
        )
        if job.status == "queued":
            await state.transition(session, job, "running")
    return claim


async def _examples(storage: BlobStorage, key: str) -> list[dict[str, Any]]:
    """The chat examples of a (validated) JSONL file."""
    content = await get_bytes(storage, key)
    examples = []
    for line in content.decode("utf-8-sig").splitlines():
        if line.strip():
            example = json.loads(line)
            if isinstance(example, dict) and isinstance(example.get("messages"), list):
                examples.append(example)
    return examples


class _Run:
    def __init__(
        self, worker: WorkerContext, storage: BlobStorage, claim: _Claim, stop: asyncio.Event
    ) -> None:
        self.worker = worker
        self.settings = worker.settings
        self.storage = storage
        self.claim = claim
        self.stop = stop
        self.sessionmaker = worker.database.sessionmaker
        self.total_steps = 0
        self.last_step = 0
        self.rows: list[dict[str, Any]] = []  # metric rows, for the result file
        self.state_step = claim.resume_step  # the resume state kept in storage

    async def run(self) -> None:
        claim = self.claim
        log.info("training", job_id=claim.job_id, model=claim.base.id)
        try:
            train = await _examples(self.storage, claim.training)
            valid = await _examples(self.storage, claim.validation) if claim.validation else None
            resume = None
            if claim.resume_step is not None:
                resume = (
                    await get_bytes(self.storage, adapter_key(claim.job_id, claim.resume_step)),
                    await get_bytes(self.storage, state_key(claim.job_id, claim.resume_step)),
                )
        except (OSError, ValueError) as exc:
            await self._fail("training_failed", f"The training data could not be read: {exc}")
            return
        hyper = resolve_hyperparameters(
            claim.hyperparameters, len(train), self.settings.local.base_learning_rate
        )
        self.total_steps = math.ceil(len(train) / hyper["batch_size"]) * hyper["n_epochs"]
        await self._adopt(hyper)
        config = engine.TrainConfig(
            n_epochs=hyper["n_epochs"],
            batch_size=hyper["batch_size"],
            learning_rate=hyper["learning_rate"],
            lora_r=hyper["lora_r"],
            lora_alpha=hyper["lora_alpha"],
            lora_dropout=hyper["lora_dropout"],
            target_modules=hyper.get("target_modules"),
            seed=claim.seed,
            max_length=claim.base.context_limit,
            device=device_for(self.settings.local.device),
        )
        engine.set_threads(self.settings.local.threads or None)
        progress = _Progress(asyncio.Queue())
        loop = asyncio.get_running_loop()

        def report(item: engine.StepReport | engine.EpochReport) -> None:
            loop.call_soon_threadsafe(progress.queue.put_nowait, item)
            with progress.lock:
                reason = progress.stop_reason
            if reason is not None and isinstance(item, engine.StepReport):
                raise engine.Stop(reason)

        training = asyncio.ensure_future(
            asyncio.to_thread(
                engine.train, claim.base, train, valid, config, report, report, resume
            )
        )
        try:
            await self._follow(training, progress)
        finally:
            if not training.done():  # cancelled (shutdown past its grace): stop the thread too
                with progress.lock:
                    progress.stop_reason = progress.stop_reason or "shutdown"
                with contextlib.suppress(BaseException):
                    await asyncio.shield(training)
        await self._settle(training, progress)

    async def _follow(self, training: asyncio.Future[Any], progress: _Progress) -> None:
        """Write reports as they come, renew the lease, and stop the thread when asked."""
        while True:
            waiter = asyncio.ensure_future(progress.queue.get())
            done, _ = await asyncio.wait(
                {training, waiter}, timeout=CHECK_SECONDS, return_when=asyncio.FIRST_COMPLETED
            )
            items = []
            if waiter in done:
                items.append(waiter.result())
            else:
                waiter.cancel()
            while not progress.queue.empty():
                items.append(progress.queue.get_nowait())
            reason = await self._write(items)
            if reason is None and self.stop.is_set():
                reason = "shutdown"
            if reason is not None:
                with progress.lock:
                    progress.stop_reason = progress.stop_reason or reason
            if training.done() and progress.queue.empty():
                return

    async def _write(self, items: list[engine.StepReport | engine.EpochReport]) -> str | None:
        """Store reports; renew the lease. Why training must stop (`cancel`, `pause`, `lost`)."""
        claim = self.claim
        for item in items:  # blobs first, outside the transaction
            if isinstance(item, engine.EpochReport):
                await put_bytes(self.storage, adapter_key(claim.job_id, item.step), item.adapter)
                await put_bytes(self.storage, state_key(claim.job_id, item.step), item.state)
                # Only the newest resume state is needed (it is twice an adapter's size).
                if self.state_step is not None and self.state_step != item.step:
                    await self.storage.delete(state_key(claim.job_id, self.state_step))
                self.state_step = item.step
        async with self.sessionmaker() as session, session.begin():
            job = await self._leased(session)
            if job is None:
                return "lost"
            cancelled = job.status == "cancelled"
            if not cancelled:
                for item in items:
                    if isinstance(item, engine.StepReport):
                        await self._step(session, job, item)
                    else:
                        await self._epoch(session, job, item)
            job.lease_until = claim.lease = utcnow() + self.settings.local.lease
            paused = job.status == "paused"
        if cancelled:
            # Steps that ended after the cancel are not reported as progress ("Training
            # stopped at step N." follows the cancel), nor kept: no checkpoint names them.
            for item in items:
                if isinstance(item, engine.EpochReport):
                    await self.storage.delete(adapter_key(claim.job_id, item.step))
            return "cancel"
        return "pause" if paused else None

    async def _leased(self, session: AsyncSession) -> Job | None:
        found: Job | None = await session.scalar(
            select(Job)
            .where(Job.id == self.claim.job_id, Job.lease_until == self.claim.lease)
            .with_for_update()
        )
        return found

    async def _step(self, session: AsyncSession, job: Job, item: engine.StepReport) -> None:
        self.last_step = item.step
        data = {
            "step": item.step,
            "train_loss": round(item.train_loss, 6),
            "total_steps": self.total_steps,
            "epoch": item.epoch,
            "learning_rate": item.learning_rate,
            "tokens": item.tokens,
        }
        event = state.add_event(
            session,
            job,
            f"Step {item.step}/{self.total_steps}: training loss={item.train_loss:.4f}",
        )
        event.type, event.data = "metrics", data
        values = {"train_loss": data["train_loss"]}
        self.rows.append({"step": item.step, **values})
        await SyncWriter(session).add_metrics(
            [{"job_id": job.id, "step": item.step, "values": values, "created_at": utcnow()}]
        )

    async def _epoch(self, session: AsyncSession, job: Job, item: engine.EpochReport) -> None:
        metrics: dict[str, Any] = {"step": item.step, "train_loss": round(item.train_loss, 6)}
        message = (
            f"Epoch {item.epoch} done at step {item.step}: training loss={item.train_loss:.4f}"
        )
        if item.valid_loss is not None:
            metrics["valid_loss"] = round(item.valid_loss, 6)
            message += f", validation loss={item.valid_loss:.4f}"
            for row in self.rows:
                if row["step"] == item.step:
                    row["valid_loss"] = metrics["valid_loss"]
            await session.execute(
                update(JobMetric)
                .where(JobMetric.job_id == job.id, JobMetric.step == item.step)
                .values(values=JobMetric.values.op("||")({"valid_loss": metrics["valid_loss"]}))
            )
        event = state.add_event(session, job, message)
        event.type, event.data = "metrics", {"epoch": item.epoch, **metrics}
        checkpoint = JobCheckpoint(
            id=new_id("ftckpt-"),
            job_id=job.id,
            project_id=job.project_id,
            fine_tuned_model_checkpoint=f"{self.claim.fine_tuned_model}:ckpt-step-{item.step}",
            step_number=item.step,
            metrics=metrics,
            created_at=utcnow(),
        )
        session.add(checkpoint)
        await session.flush()
        await emit(
            session,
            job.project_id,
            "fine_tuning.job.checkpoint.created",
            job.id,
            JobCheckpointObject.of(checkpoint).model_dump(mode="json"),
        )

    async def _adopt(self, hyper: dict[str, Any]) -> None:
        """Show the resolved hyperparameters on the job, as OpenAI does once a job starts."""
        async with self.sessionmaker() as session, session.begin():
            job = await self._leased(session)
            if job is None:
                return
            shown = {k: v for k, v in hyper.items() if k != "learning_rate"}
            job.hyperparameters = shown
            method = dict(job.method or {"type": "supervised"})
            method[method.get("type", "supervised")] = {"hyperparameters": shown}
            job.method = method

    async def _settle(self, training: asyncio.Future[Any], progress: _Progress) -> None:
        try:
            result = training.result()
        except engine.Stop as stopped:
            await self._stopped(stopped.reason)
            return
        except Exception as exc:
            log.exception("training failed", job_id=self.claim.job_id)
            await self._fail("training_failed", f"Training failed: {type(exc).__name__}: {exc}")
            return
        await self._succeed(result)

    async def _stopped(self, reason: str) -> None:
        async with self.sessionmaker() as session, session.begin():
            job = await self._leased(session)
            if job is None:
                return
            job.lease_until = None
            if reason == "shutdown":
                job.submit_attempts = max(0, job.submit_attempts - 1)  # not the job's fault
                job.next_attempt_at = utcnow()
                state.add_event(
                    session,
                    job,
                    f"The trainer stopped at step {self.last_step}; another trainer resumes "
                    "the job from its last checkpoint.",
                    level="warn",
                )
            elif reason == "pause":
                state.add_event(
                    session,
                    job,
                    f"Training paused at step {self.last_step}; resuming continues from the "
                    "last checkpoint.",
                )
            else:
                state.add_event(session, job, f"Training stopped at step {self.last_step}.")
        if reason == "cancel":
            await self._drop_state()

    async def _fail(self, code: str, message: str) -> None:
        async with self.sessionmaker() as session, session.begin():
            job = await self._leased(session)
            if job is None:
                return
            job.lease_until = None
            if not state.is_terminal(job.status):
                error = {"code": code, "message": message[:2000], "param": None}
                await state.transition(session, job, "failed", error=error)

    async def _succeed(self, result: engine.TrainResult) -> None:
        claim = self.claim
        await put_bytes(self.storage, adapter_key(claim.job_id), result.adapter)
        files = FilesContext(self.settings, self.storage, self.sessionmaker)
        async with self.sessionmaker() as session, session.begin():
            job = await self._leased(session)
            if job is None:
                return
            job.lease_until = None
            if state.is_terminal(job.status) or job.status == "paused":
                return  # cancelled or paused as the last step finished
            job.trained_tokens = result.trained_tokens
            job.fine_tuned_model = claim.fine_tuned_model
            results = await file_from_bytes(
                session,
                files,
                job.project_id,
                "step_metrics.csv",
                self._result_csv(),
                RESULT_PURPOSE,
            )
            job.result_files = [results.id]
            await SyncWriter(session).add_fine_tuned_model(job, claim.fine_tuned_model)
            await state.transition(session, job, "succeeded")
        log.info("training succeeded", job_id=claim.job_id, steps=result.steps)
        await self._drop_state()

    async def _drop_state(self) -> None:
        """A finished job is never resumed: its resume state goes (adapters stay)."""
        if self.state_step is not None:
            await self.storage.delete(state_key(self.claim.job_id, self.state_step))

    def _result_csv(self) -> bytes:
        """OpenAI's result file shape: one row per step."""
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["step", "train_loss", "valid_loss"])
        for row in sorted(self.rows, key=lambda r: r["step"]):
            writer.writerow([row["step"], row["train_loss"], row.get("valid_loss", "")])
        return out.getvalue().encode()


register_role(ROLE, trainer_loop)
