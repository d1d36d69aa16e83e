"""Everything the emulator knows, in memory: files, jobs, fine-tuned models, request counts.

One `EmulatorState` per app. Handlers run on one event loop and never await while changing it,
so no lock is needed. `refresh(now)` runs before every API request (and in the webhook loop): it
gives jobs that have succeeded since the last look their result file and their model, so
`/v1/models` and `/v1/files` show them even if nobody polled the job, and tells `end_listeners`
about every job that has ended.
"""

from __future__ import annotations

import heapq
import secrets
import string
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from app.providers.emulator.faults import FaultConfig, FaultState
from app.providers.emulator.lifecycle import VALIDATING_SECONDS, Clock, JobPlan, result_csv
from app.providers.emulator.timeline import (
    ACTIVE_STATUSES,
    finished_at,
    job_checkpoints,
    job_status,
)

_ALPHANUMERIC = string.ascii_letters + string.digits


def random_id(prefix: str, length: int = 24) -> str:
    return prefix + "".join(secrets.choice(_ALPHANUMERIC) for _ in range(length))


@dataclass
class StoredFile:
    id: str
    filename: str
    purpose: str
    content: bytes
    created_at: int

    def to_json(self) -> dict[str, Any]:
        # `expires_at` and `status_details` are left out rather than sent as null: OpenAI's
        # published schema types them as integer/string, and the SDK reads a missing one as None.
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.content),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
        }


@dataclass
class ManualEvent:
    """An event caused by a call (pause, resume, cancel) rather than by the clock."""

    progress: float
    wall: float
    message: str
    sequence: int


@dataclass
class StoredJob:
    id: str
    short_id: str
    created: float
    model: str
    base_model: str
    training_file: str
    validation_file: str | None
    suffix: str | None
    seed: int
    metadata: dict[str, str] | None
    method_type: str
    method_options: dict[str, Any]
    """What the caller sent under `method.<type>` besides hyperparameters (a grader ...)."""
    requested_hyperparameters: dict[str, Any]
    integrations: list[Any] | None
    clock: Clock
    plan: JobPlan | None
    failure: dict[str, Any] | None
    answers: dict[str, str] = field(default_factory=dict)
    manual_events: list[ManualEvent] = field(default_factory=list)
    result_file_id: str | None = None

    def model_name(self, organization: str) -> str:
        """`ft:<base>:<org>:<suffix>:<id>`, the suffix left empty when none was given."""
        return f"ft:{self.base_model}:{organization}:{self.suffix or ''}:{self.short_id}"

    def add_event(self, message: str, now: float) -> None:
        self.manual_events.append(
            ManualEvent(self.clock.progress(now), now, message, len(self.manual_events))
        )


@dataclass
class FineTunedModel:
    id: str
    created: int
    owned_by: str
    job_id: str


@dataclass
class EmulatorState:
    speed: float
    organization: str
    faults: FaultState
    clock: Callable[[], float] = time.time
    files: dict[str, StoredFile] = field(default_factory=dict)
    jobs: dict[str, StoredJob] = field(default_factory=dict)
    models: dict[str, FineTunedModel] = field(default_factory=dict)
    deleted_models: set[str] = field(default_factory=set)
    requests: dict[tuple[str, str], Counter[str]] = field(default_factory=dict)
    end_listeners: list[Callable[[StoredJob, float], None]] = field(default_factory=list)
    """Told once per job, with the time it was noticed, when it succeeds, fails or is cancelled."""
    finishing: list[tuple[float, str]] = field(default_factory=list)
    """A heap of (wall-clock time the job ends by itself, job id) of jobs not yet ended."""
    jobs_by_short_id: dict[str, StoredJob] = field(default_factory=dict)
    streams: Counter[str] = field(default_factory=Counter)
    """Streamed chat completions: started, finished, cancelled (the client went away)."""

    @classmethod
    def create(cls, speed: float, organization: str, faults: FaultConfig | None) -> EmulatorState:
        if speed <= 0:
            raise ValueError("speed must be > 0")
        return cls(speed=speed, organization=organization, faults=FaultState(faults))

    def add_file(self, filename: str, purpose: str, content: bytes, created_at: int) -> StoredFile:
        stored = StoredFile(random_id("file-", 22), filename, purpose, content, created_at)
        self.files[stored.id] = stored
        return stored

    def count_request(self, method: str, path: str, outcome: str) -> None:
        self.requests.setdefault((method, path), Counter())[outcome] += 1

    def requests_json(self) -> dict[str, Any]:
        data = [
            {"method": method, "path": path, "count": sum(c.values()), "outcomes": dict(c)}
            for (method, path), c in sorted(self.requests.items())
        ]
        return {"object": "list", "data": data, "total": sum(d["count"] for d in data)}

    def job_ended(self, job: StoredJob, now: float) -> None:
        for listener in self.end_listeners:
            listener(job, now)

    def tick(self) -> float:
        """The current time, with every job's finishing touches applied up to it."""
        now = self.clock()
        self.refresh(now)
        return now

    def add_job(self, job: StoredJob) -> None:
        self.jobs[job.id] = job
        self.jobs_by_short_id[job.short_id] = job
        heapq.heappush(self.finishing, (_ends_at(job), job.id))

    def refresh(self, now: float) -> None:
        """Give jobs that have succeeded by `now` their result file and fine-tuned model, and
        tell `end_listeners` about jobs that have succeeded or failed.

        Only jobs whose end has come are looked at (a heap by wall-clock end), so a request
        costs the same with ten jobs or ten thousand. A pause moves the end later: such a job
        is put back with its new time. A cancel announces itself (`job_ended`)."""
        while self.finishing and self.finishing[0][0] <= now:
            _, job_id = heapq.heappop(self.finishing)
            job = self.jobs[job_id]
            status = job_status(job, now)
            if status in ACTIVE_STATUSES:
                heapq.heappush(self.finishing, (max(_ends_at(job), now + 0.5), job_id))
                continue
            if status == "cancelled":
                continue
            if status == "succeeded" and job.plan is not None:
                done = int(finished_at(job, now) or now)
                content = result_csv(job.seed, job.plan)
                result = self.add_file("step_metrics.csv", "fine-tune-results", content, done)
                job.result_file_id = result.id
                name = job.model_name(self.organization)
                if name not in self.deleted_models:
                    self.models[name] = FineTunedModel(name, done, self.organization, job.id)
            self.job_ended(job, now)

    def job_for_model(self, model: str, now: float) -> StoredJob | None:
        """The succeeded job behind a fine-tuned model or one of its checkpoints."""
        if model in self.models:
            return self.jobs.get(self.models[model].job_id)
        # `<model name>:ckpt-step-<n>`, and a model name ends with the job's short id.
        name, marker, _ = model.rpartition(":ckpt-step-")
        job = self.jobs_by_short_id.get(name.rpartition(":")[2]) if marker else None
        if job is None or job.model_name(self.organization) != name:
            return None
        checkpoints = job_checkpoints(job, now, self.organization)
        return job if any(c["fine_tuned_model_checkpoint"] == model for c in checkpoints) else None


def _ends_at(job: StoredJob) -> float:
    """When (wall clock, pauses so far included) the job succeeds or fails unless cancelled."""
    if job.plan is None or job.failure is not None:
        return job.clock.wall_at(VALIDATING_SECONDS)
    return job.clock.wall_at(job.plan.finishes_at)
