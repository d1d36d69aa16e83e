"""What a job looks like at a given moment: status, events, checkpoints and the job object.

Pure functions of a stored job and the wall clock (see `lifecycle` for the phases). Event and
checkpoint ids are derived from the job id and the step, so repeated reads agree and cursor
pagination (`after=<id>`) works.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from app.providers.emulator.lifecycle import VALIDATING_SECONDS, stable_id, step_metrics

if TYPE_CHECKING:
    from app.providers.emulator.state import StoredJob

ACTIVE_STATUSES = frozenset({"validating_files", "queued", "running", "paused"})
HYPERPARAMETERS = ("batch_size", "learning_rate_multiplier", "n_epochs")
DPO_DEFAULT_BETA = 0.1


def job_status(job: StoredJob, now: float) -> str:
    if job.clock.stopped is not None:
        return "cancelled"
    progress = job.clock.progress(now)
    if progress < VALIDATING_SECONDS:
        return "validating_files"
    if job.failure is not None or job.plan is None:
        return "failed"
    if progress < job.plan.running_from:
        return "queued"
    if progress < job.plan.finishes_at:
        return "paused" if job.clock.paused else "running"
    return "succeeded"


def finished_at(job: StoredJob, now: float) -> float | None:
    status = job_status(job, now)
    if status == "cancelled":
        return job.clock.stopped
    if status == "failed":
        return job.clock.wall_at(VALIDATING_SECONDS)
    if status == "succeeded" and job.plan is not None:
        return job.clock.wall_at(job.plan.finishes_at)
    return None


def _event(
    job: StoredJob,
    key: object,
    wall: float,
    message: str,
    *,
    level: str = "info",
    kind: str = "message",
    data: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "object": "fine_tuning.job.event",
        "id": stable_id("ftevent-", job.id, key),
        "created_at": int(wall),
        "level": level,
        "message": message,
        "data": data or {},
        "type": kind,
    }


def job_events(job: StoredJob, now: float) -> list[dict[str, Any]]:
    """Every event that has happened by `now`, oldest first."""
    progress = job.clock.progress(now)
    timed: list[tuple[float, int, int, dict[str, Any]]] = []

    def add(at: float, key: object, message: str, **extra: Any) -> None:
        if at <= progress:
            event = _event(job, key, job.clock.wall_at(at), message, **extra)
            timed.append((at, 0, len(timed), event))

    add(0.0, "created", f"Created fine-tuning job: {job.id}")
    add(0.0, "validating", f"Validating training file: {job.training_file}")
    if job.validation_file:
        add(0.0, "validating-2", f"Validating validation file: {job.validation_file}")
    plan = job.plan
    if job.failure is not None or plan is None:
        failure = job.failure or {}
        add(VALIDATING_SECONDS, "failed", str(failure.get("message", "")), level="error")
    else:
        add(VALIDATING_SECONDS, "validated", "Files validated, moving job to queued state")
        add(plan.running_from, "started", "Fine-tuning job started")
        checkpoints = set(plan.checkpoint_steps())
        for step in range(1, plan.total_steps + 1):
            at = plan.step_at(step)
            if at > progress:
                break
            metrics = step_metrics(job.seed, step, plan)
            message = f"Step {step}/{plan.total_steps}: training loss={metrics['train_loss']:.4f}"
            if "valid_loss" in metrics:
                message += f", validation loss={metrics['valid_loss']:.4f}"
            data: dict[str, Any] = {**metrics, "step": step, "total_steps": plan.total_steps}
            add(at, ("step", step), message, kind="metrics", data=data)
            if step in checkpoints:
                add(at, ("checkpoint", step), f"Checkpoint created at step {step}")
        add(plan.finishes_at, "model", f"New fine-tuned model created: {job.short_id}")
        add(plan.finishes_at, "done", "The job has successfully completed")
    for manual in job.manual_events:
        event = _event(job, ("manual", manual.sequence), manual.wall, manual.message)
        timed.append((manual.progress, 1, manual.sequence, event))
    timed.sort(key=lambda item: item[:3])
    return [event for *_, event in timed]


def job_checkpoints(job: StoredJob, now: float, organization: str) -> list[dict[str, Any]]:
    """Checkpoints made by `now` (one per epoch), newest first."""
    plan = job.plan
    if plan is None or job.failure is not None:
        return []
    progress = job.clock.progress(now)
    made = []
    for step in plan.checkpoint_steps():
        at = plan.step_at(step)
        if at > progress:
            break
        metrics: dict[str, float] = step_metrics(job.seed, step, plan)
        if plan.has_validation:
            metrics["full_valid_loss"] = metrics["valid_loss"]
            metrics["full_valid_mean_token_accuracy"] = metrics["valid_mean_token_accuracy"]
        made.append(
            {
                "object": "fine_tuning.job.checkpoint",
                "id": stable_id("ftckpt_", job.id, step),
                "created_at": int(job.clock.wall_at(at)),
                "fine_tuned_model_checkpoint": f"{job.model_name(organization)}:ckpt-step-{step}",
                "fine_tuning_job_id": job.id,
                "step_number": step,
                "metrics": metrics,
            }
        )
    return list(reversed(made))


def _hyperparameters(job: StoredJob, resolved: bool) -> dict[str, Any]:
    requested = job.requested_hyperparameters
    if resolved and job.plan is not None:
        values: dict[str, Any] = {
            "batch_size": job.plan.batch_size,
            "learning_rate_multiplier": job.plan.learning_rate_multiplier,
            "n_epochs": job.plan.n_epochs,
        }
    else:
        values = {name: requested.get(name, "auto") for name in HYPERPARAMETERS}
    return values


def job_json(job: StoredJob, now: float, organization: str) -> dict[str, Any]:
    """The job as OpenAI's `FineTuningJob` object."""
    status = job_status(job, now)
    progress = job.clock.progress(now)
    resolved = job.plan is not None and job.failure is None and progress >= VALIDATING_SECONDS
    hyperparameters = _hyperparameters(job, resolved)
    method_hyperparameters = dict(hyperparameters)
    for name, value in job.requested_hyperparameters.items():
        if name not in HYPERPARAMETERS:
            method_hyperparameters[name] = value
    if job.method_type == "dpo":
        beta = job.requested_hyperparameters.get("beta", "auto")
        method_hyperparameters["beta"] = DPO_DEFAULT_BETA if resolved and beta == "auto" else beta
    succeeded = status == "succeeded"
    estimated_finish = None
    if status in {"queued", "running"} and job.plan is not None:
        estimated_finish = int(now + (job.plan.finishes_at - progress) / job.clock.speed)
    done = finished_at(job, now)
    return {
        "object": "fine_tuning.job",
        "id": job.id,
        "model": job.model,
        "created_at": int(job.created),
        "finished_at": int(done) if done is not None else None,
        "fine_tuned_model": job.model_name(organization) if succeeded else None,
        "organization_id": organization,
        "result_files": [job.result_file_id] if succeeded and job.result_file_id else [],
        "status": status,
        "validation_file": job.validation_file,
        "training_file": job.training_file,
        "hyperparameters": hyperparameters,
        "trained_tokens": job.plan.trained_tokens if succeeded and job.plan else None,
        "error": job.failure if status == "failed" else None,
        "seed": job.seed,
        "estimated_finish": estimated_finish,
        "integrations": job.integrations,
        "metadata": job.metadata,
        "method": {
            "type": job.method_type,
            job.method_type: {**job.method_options, "hyperparameters": method_hyperparameters},
        },
        "user_provided_suffix": job.suffix,
    }
