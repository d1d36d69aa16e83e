"""Creating and managing fine-tuning jobs.

`create_job` checks everything before anything is submitted (files, validation, model and
method, hyperparameters, metadata, budget) and stores the job as `validating_files`; the
submitter worker (`tasks.py`) then creates it at the provider. Cancel, pause and resume call the
provider when the job is there, and every status change goes through `state.transition`.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.config import Settings
from app.files import service as files
from app.files.storage import BlobStorage
from app.jobs import state
from app.jobs.repository import JobRepository, schedule_now
from app.jobs.schemas import JobCreate
from app.jobs.tasks import TAG
from app.kit.errors import BadRequest, Conflict, InvalidPayload, NotFound
from app.kit.ids import new_id
from app.kit.time import utcnow
from app.models import File, Job, Project
from app.providers.api_errors import as_api_error, provider_not_configured
from app.providers.base import Provider, ProviderError
from app.registry import service as registry
from app.validation import service as validations
from app.validation.catalog import snapshot_of
from app.validation.cost import cost_report
from app.validation.schemas import Hyperparameters
from app.validation.service import ValidationContext
from app.validation.target import Target

LOCAL = "local"  # its jobs are run by the trainer role from this database, never submitted
LORA_KEYS = ("lora_r", "lora_alpha", "lora_dropout", "target_modules")


@dataclass(frozen=True)
class JobsContext:
    settings: Settings
    storage: BlobStorage
    sessionmaker: async_sessionmaker[AsyncSession]
    providers: dict[str, Provider]

    @property
    def validation(self) -> ValidationContext:
        return ValidationContext(self.settings, self.storage, self.sessionmaker)


def _method_and_hyperparameters(body: JobCreate) -> tuple[str, dict[str, Any]]:
    method = body.method.type if body.method is not None else "supervised"
    nested: Hyperparameters | None = None
    if body.method is not None:
        details = body.method.supervised if method == "supervised" else body.method.dpo
        nested = details.hyperparameters if details is not None else None
        other = body.method.dpo if method == "supervised" else body.method.supervised
        if other is not None:
            unused = "dpo" if method == "supervised" else "supervised"
            raise InvalidPayload(
                f"method.type is '{method}' but method.{unused} was given.", param="method"
            )
    if nested is not None and body.hyperparameters is not None:
        raise InvalidPayload(
            "Give hyperparameters either in method or at the top level (deprecated), not both.",
            param="hyperparameters",
        )
    chosen = nested or body.hyperparameters or Hyperparameters()
    values = chosen.model_dump(exclude_none=True)
    if method == "supervised" and chosen.beta is not None:
        raise InvalidPayload("beta applies to the dpo method only.", param="hyperparameters.beta")
    if method == "dpo":
        values.setdefault("beta", "auto")
    return method, values


def _provider_for(context: JobsContext, requested: str | None, model_provider: str) -> Provider:
    name = requested or model_provider
    provider = context.providers.get(name)
    if provider is not None:
        return provider
    if name == "openai":
        raise BadRequest(
            "No OpenAI provider is configured: set OPENAI_API_KEY (and OPENAI_BASE_URL for an "
            "OpenAI-compatible server such as `tunegate emulator`), then restart tunegate.",
            param="provider",
            code="provider_not_configured",
        )
    known = ", ".join(sorted(context.providers)) or "none configured"
    raise BadRequest(
        f"Provider '{name}' is not available (available: {known}).",
        param="provider",
        code="provider_not_configured",
    )


async def _check_file(context: JobsContext, project_id: str, file_id: str, param: str) -> File:
    async with context.sessionmaker() as reader:
        try:
            file = await files.get_file(reader, project_id, file_id)
        except NotFound:
            raise BadRequest(
                f"invalid {param}: {file_id}", param=param, code="invalid_file"
            ) from None
    if file.purpose != "fine-tune":
        raise BadRequest(
            f"File {file_id} has purpose '{file.purpose}'; fine-tuning needs purpose 'fine-tune'.",
            param=param,
            code="invalid_file",
        )
    return file


async def create_job(
    session: AsyncSession, context: JobsContext, project_id: str, body: JobCreate
) -> Job:
    # The model first: an unknown model is a 404 whatever else is wrong with the request.
    validations.resolve_target(
        context.settings, body.model, body.method.type if body.method else "supervised"
    )
    if body.model.startswith("ft:"):
        await _check_tuned_model(session, project_id, body.model)
    method, hyperparameters = _method_and_hyperparameters(body)
    if body.integrations:
        raise BadRequest(
            "integrations are not supported by tunegate (use its webhooks).",
            param="integrations",
        )
    target = validations.resolve_target(
        context.settings,
        body.model,
        method,
        hyperparameters["n_epochs"] if isinstance(hyperparameters.get("n_epochs"), int) else None,
    )
    provider = _provider_for(context, body.provider, target.model.provider)
    if provider.name != target.model.provider:
        raise BadRequest(
            f"The model '{body.model}' is a base model of the '{target.model.provider}' "
            f"provider, not of '{provider.name}'.",
            param="model",
            code="model_not_available",
        )
    lora = sorted(key for key in LORA_KEYS if hyperparameters.get(key) is not None)
    if lora and provider.name != LOCAL:
        raise InvalidPayload(
            f"{', '.join(lora)} apply to the local provider's LoRA training only.",
            param=f"hyperparameters.{lora[0]}",
        )
    if body.metadata is not None and TAG in body.metadata and provider.name != LOCAL:
        raise InvalidPayload(
            f"The metadata key '{TAG}' is reserved: tunegate tags the provider's job with it "
            "to find the job again after a failure.",
            param=f"metadata.{TAG}",
        )
    if body.metadata is not None and len(body.metadata) >= 16 and provider.name == "openai":
        raise InvalidPayload(
            "At most 15 metadata pairs for OpenAI jobs: tunegate uses one (tunegate_job_id) to "
            "find the job at OpenAI again after a failure.",
            param="metadata",
        )

    if body.evaluate and body.validation_file is None:
        raise InvalidPayload(
            "evaluate needs a validation_file: the fine-tuned model is evaluated on it.",
            param="evaluate",
        )
    if body.evaluate and method != "supervised":
        raise InvalidPayload(
            f"evaluate applies to supervised jobs (chat examples with an expected answer), "
            f"not to {method} ones.",
            param="evaluate",
        )
    await _check_file(context, project_id, body.training_file, "training_file")
    if body.validation_file is not None:
        held_out_file = await _check_file(
            context, project_id, body.validation_file, "validation_file"
        )
        if body.evaluate and held_out_file.format != "chat":
            raise InvalidPayload(
                f"evaluate needs a chat validation file; {body.validation_file} is "
                f"{held_out_file.format} data.",
                param="evaluate",
            )
    training = await validations.report_for_target(
        session, context.validation, project_id, body.training_file, target, "training_file"
    )
    _refuse_invalid(training, body.training_file, "training_file")
    if body.validation_file is not None:
        held_out = await validations.report_for_target(
            session, context.validation, project_id, body.validation_file, target, "validation_file"
        )
        _refuse_invalid(held_out, body.validation_file, "validation_file")

    estimated_cost = _estimated_cost(training.report or {}, target)
    project = await session.get(Project, project_id)
    budget = None if project is None else project.training_budget_usd
    if budget is not None and estimated_cost is not None and estimated_cost > budget:
        raise BadRequest(
            f"The estimated cost of this job, ${estimated_cost:.2f}, is over the project's "
            f"training budget of ${budget:.2f}.",
            param="training_file",
            code="budget_exceeded",
        )

    now = utcnow()
    # An undated name ("gpt-4o-mini") is stored and sent as the snapshot it names, which the
    # job object then shows, as OpenAI's does.
    model = snapshot_of(body.model)
    job = Job(
        id=new_id("ftjob-"),
        provider=provider.name,
        model=model,
        training_file=body.training_file,
        validation_file=body.validation_file,
        method={"type": method, method: {"hyperparameters": hyperparameters}},
        hyperparameters=hyperparameters,
        suffix=body.suffix,
        seed=body.seed if body.seed is not None else secrets.randbelow(2**31),
        job_metadata=body.metadata,
        status="validating_files",
        result_files=[],
        estimated_cost_usd=estimated_cost,
        evaluate=body.evaluate,
        submit_attempts=0,
        next_attempt_at=now,
        created_at=now,
    )
    JobRepository(session, project_id).add(job)
    state.add_event(session, job, f"Created fine-tuning job: {job.id}", at=now)
    if provider.name == LOCAL:
        # Its files were validated above, and there is nothing to submit: it waits for a trainer.
        job.status = "queued"
        state.add_event(
            session,
            job,
            "Files validated; waiting for a trainer.",
            data={"status": "queued", "previous_status": "validating_files"},
            at=now + timedelta(microseconds=2),
        )
    shutdown = await registry.shutdown_within(
        session, provider.name, model, context.settings.jobs.shutdown_warning_days, now.date()
    )
    if shutdown is not None:
        state.add_event(
            session,
            job,
            f"The base model {model} shuts down at {provider.name} on {shutdown}; "
            "plan a move to a newer model.",
            level="warn",
            data={"shutdown_date": shutdown},
            at=now + timedelta(microseconds=1),
        )
    await session.flush()
    await state.announce(session, job, "fine_tuning.job.created")
    return job


async def _check_tuned_model(session: AsyncSession, project_id: str, model: str) -> None:
    """Continued fine-tuning starts from a fine-tuned model or checkpoint of the project's own
    (another project's is not found, as in chat), and only at a provider that can."""
    provider = await registry.tuned_model_provider(session, project_id, model)
    if provider is None:
        raise registry.model_not_found(model)
    if provider == LOCAL:
        raise BadRequest(
            f"The local provider cannot fine-tune a fine-tuned model ('{model}') further: "
            "fine-tune its base model on the earlier training data and the new data together.",
            param="model",
            code="model_not_available",
        )


def _refuse_invalid(report_row: Any, file_id: str, param: str) -> None:
    if report_row.verdict != "invalid":
        return
    report = report_row.report or {}
    errors = report.get("errors") or []
    first = errors[0] if errors else {}
    where = ""
    occurrences = first.get("occurrences") or []
    if occurrences:
        where = f" at line {occurrences[0].get('line')}"
    total = sum(e.get("count", 0) for e in errors)
    raise BadRequest(
        f"File {file_id} has {total} validation error(s) (first: {first.get('code')}{where}: "
        f"{first.get('message')}). Read the report: GET /v1/files/{file_id}/validations/"
        f"{report_row.id}",
        param=param,
        code="invalid_training_file" if param == "training_file" else "invalid_validation_file",
    )


def _estimated_cost(report: dict[str, Any], target: Target) -> float | None:
    examples = int(report.get("examples") or 0)
    per_epoch = int((report.get("tokens") or {}).get("billable_per_epoch") or 0)
    usd: float | None = cost_report(target, examples, per_epoch, usd_digits=4)["usd"]
    return usd


def _not_found(job_id: str) -> NotFound:
    return NotFound(f"Fine-tuning job {job_id} not found.", param="fine_tuning_job_id")


async def get_job(session: AsyncSession, project_id: str, job_id: str) -> Job:
    job = await JobRepository(session, project_id).get(job_id)
    if job is None:
        raise _not_found(job_id)
    return job


async def _lock_job(session: AsyncSession, project_id: str, job_id: str) -> Job:
    job = await JobRepository(session, project_id).get(job_id, for_update=True)
    if job is None:
        raise _not_found(job_id)
    return job


async def _read_job(context: JobsContext, project_id: str, job_id: str) -> Job:
    """A read in its own short session: provider calls follow, with no transaction open."""
    async with context.sessionmaker() as reader:
        return await get_job(reader, project_id, job_id)


async def _provider_call(context: JobsContext, job: Job, action: str) -> Any:
    provider = context.providers.get(job.provider)
    if provider is None:
        raise provider_not_configured(job.provider, "this job")
    assert job.provider_job_id is not None
    try:
        call = getattr(provider, f"{action}_job")
        return await call(job.provider_job_id)
    except ProviderError as exc:
        if not exc.retryable:
            # Refused, most often because the job has moved on at the provider (finished,
            # failed): read its state now rather than at the next scheduled sync.
            async with context.sessionmaker() as session, session.begin():
                locked = await JobRepository(session, job.project_id).get(job.id, for_update=True)
                if locked is not None and not state.is_terminal(locked.status):
                    schedule_now(locked, utcnow())
        # The caller knows the job by tunegate's id, not by the provider's.
        exc.message = exc.message.replace(job.provider_job_id, job.id)
        exc.args = (exc.message,)
        raise as_api_error(exc, f"{action} the job") from None


async def cancel_job(
    session: AsyncSession, context: JobsContext, project_id: str, job_id: str
) -> Job:
    job = await _read_job(context, project_id, job_id)
    if state.is_terminal(job.status):
        raise BadRequest(
            f"Job {job_id} has already {job.status}; only unfinished jobs can be cancelled.",
            code="job_finished",
        )
    if job.provider_job_id is not None:
        await _provider_call(context, job, "cancel")
    locked = await _lock_job(session, project_id, job_id)
    if not state.is_terminal(locked.status):
        await state.transition(session, locked, "cancelled")
    locked.sync_due_at = None
    return locked


async def pause_or_resume(
    session: AsyncSession, context: JobsContext, project_id: str, job_id: str, action: str
) -> Job:
    job = await _read_job(context, project_id, job_id)
    provider = context.providers.get(job.provider)
    if provider is not None and not provider.supports_pause:
        raise BadRequest(
            f"The '{job.provider}' provider cannot {action} jobs.", code=f"{action}_not_supported"
        )
    wanted, needed = ("paused", "running") if action == "pause" else ("running", "paused")
    if job.status != needed:
        raise BadRequest(
            f"Job {job_id} is {job.status}; only a {needed} job can be {wanted}.",
            code=f"cannot_{action}",
        )
    if job.provider == LOCAL:
        # The trainer sees the status between steps: a pause stops it (its checkpoints stay),
        # a resume queues the job for the next free trainer, which continues from the last one.
        locked = await _lock_job(session, project_id, job_id)
        if locked.status == needed:
            await state.transition(session, locked, "paused" if action == "pause" else "queued")
            locked.next_attempt_at = utcnow()
        return locked
    if job.provider_job_id is None:
        raise Conflict(f"Job {job_id} is not at its provider yet; retry shortly.")
    await _provider_call(context, job, action)
    locked = await _lock_job(session, project_id, job_id)
    if state.can_transition(locked.status, wanted):
        await state.transition(session, locked, wanted)
    schedule_now(locked, utcnow())  # the provider's own events for the change follow
    return locked


async def request_sync(session: AsyncSession, project_id: str, job_id: str) -> Job:
    """Make an unfinished, submitted job due for a sync now (`POST …/sync`)."""
    job = await _lock_job(session, project_id, job_id)
    if not state.is_terminal(job.status) and job.provider_job_id is not None:
        schedule_now(job, utcnow())
    return job


async def ensure_not_in_use(session: AsyncSession, project_id: str, file_id: str) -> None:
    """A file an unfinished job trains on cannot be deleted."""
    using = await JobRepository(session, project_id).active_jobs_using(file_id)
    if using:
        raise Conflict(
            f"File {file_id} is used by unfinished fine-tuning job(s) {', '.join(using)}; "
            "cancel them or wait until they finish.",
            param="file_id",
            code="file_in_use",
        )
