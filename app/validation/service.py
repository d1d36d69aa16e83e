"""Validation reports and cost estimates.

A report is made inline when the file is small (`TUNEGATE_VALIDATION__INLINE_MAX_BYTES`), else
queued for the validator worker (`tasks.py`). Either way the engine (`engine.validate_file`) reads
the stored blob once, streaming.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.config import Settings
from app.files import service as files
from app.files.storage import BlobStorage, blob_key
from app.kit.errors import Conflict, InvalidPayload, NotFound
from app.kit.ids import new_id
from app.kit.logging import get_logger
from app.kit.time import utcnow
from app.models import File, ValidationReport
from app.validation.catalog import ModelSpec, known_models, resolve_model
from app.validation.cost import cost_report
from app.validation.engine import Progress, Target, validate_file
from app.validation.repository import ValidationRepository
from app.validation.schemas import Estimate, EstimateCreate, Hyperparameters, ValidationObject
from app.webhooks.events import emit

log = get_logger("tunegate.validation")


@dataclass(frozen=True)
class ValidationContext:
    settings: Settings
    storage: BlobStorage
    sessionmaker: async_sessionmaker[AsyncSession]


def resolve_target(
    settings: Settings, model: str, method: str, n_epochs: int | None = None
) -> Target:
    spec = resolve_model(model)
    if spec is None:
        names = ", ".join(sorted({m.id for m in known_models()}))
        raise NotFound(
            f"The model '{model}' does not exist or cannot be fine-tuned. Known models: {names}.",
            param="model",
            code="model_not_found",
        )
    if method not in spec.methods:
        raise InvalidPayload(
            f"Model {spec.id} does not support the '{method}' method "
            f"(it supports: {', '.join(spec.methods)}).",
            param="method",
        )
    return Target(
        model=spec,
        method=method,  # type: ignore[arg-type]
        n_epochs=n_epochs,
        price_override_usd_per_1m=_price_override(settings, spec, model),
    )


def _price_override(settings: Settings, spec: ModelSpec, asked: str) -> float | None:
    overrides = settings.validation.price_overrides
    return overrides.get(spec.id, overrides.get(asked))


async def run_engine(
    context: ValidationContext,
    sha256: str,
    target: Target,
    progress: Progress | None = None,
) -> dict[str, Any]:
    async with context.storage.materialize(blob_key(sha256)) as path:
        return await asyncio.to_thread(
            validate_file,
            path,
            target,
            progress=progress,
            max_line_bytes=context.settings.validation.max_line_bytes,
        )


def with_file_id(report: dict[str, Any], file_id: str) -> dict[str, Any]:
    """The engine knows paths, not File ids: name the file in its conversion hints."""
    for item in report.get("errors", []):
        for entry in (item, *item.get("occurrences", [])):
            if isinstance(entry.get("message"), str):
                entry["message"] = entry["message"].replace(
                    "/v1/files/{id}/", f"/v1/files/{file_id}/"
                )
    return report


def succeeded_values(report: dict[str, Any], file_id: str) -> dict[str, Any]:
    """The columns a finished engine run sets (`bytes_done` aside: it becomes `bytes_total`)."""
    report = with_file_id(report, file_id)
    return {
        "status": "succeeded",
        "report": report,
        "verdict": report["verdict"],
        "lines_done": int(report.get("lines", 0)),
        "finished_at": utcnow(),
    }


def record_outcome(row: ValidationReport, report: dict[str, Any]) -> None:
    for column, value in succeeded_values(report, row.file_id).items():
        setattr(row, column, value)
    row.bytes_done = row.bytes_total


async def create_validation(
    session: AsyncSession,
    context: ValidationContext,
    project_id: str,
    file: File,
    target: Target,
) -> ValidationReport:
    """A report for `file`: done now when the file is small, else queued for the worker."""
    row = ValidationReport(
        id=new_id("fval_"),
        file_id=file.id,
        model=target.model.id,
        method=target.method,
        n_epochs=target.n_epochs,
        status="queued",
        bytes_total=file.bytes,
        bytes_done=0,
        lines_done=0,
        cancel_requested=False,
        attempts=0,
    )
    if file.bytes <= context.settings.validation.inline_max_bytes:
        row.status = "running"
        row.started_at = utcnow()
        try:
            record_outcome(row, await run_engine(context, file.sha256, target))
        except Exception as exc:  # a validator bug must not lose the upload: record it
            log.exception("inline validation failed", file_id=file.id)
            row.status = "failed"
            row.error = f"The validator failed ({type(exc).__name__}); the report was not made."
            row.finished_at = utcnow()
    ValidationRepository(session, project_id).add(row)
    await session.flush()
    await announce_finished(session, row)
    return row


async def announce_finished(session: AsyncSession, row: ValidationReport) -> None:
    """`file.validated` for a report that has just succeeded or failed (not one still queued)."""
    if row.status in {"succeeded", "failed"}:
        data = ValidationObject.of(row).model_dump(mode="json")
        await emit(session, row.project_id, "file.validated", row.file_id, data)


async def validate_after_upload(
    session: AsyncSession, context: ValidationContext, project_id: str, file: File
) -> ValidationReport | None:
    """Every fine-tune file is checked against the default model right away."""
    if file.purpose != "fine-tune":
        return None
    target = resolve_target(
        context.settings, context.settings.validation.default_model, "supervised"
    )
    return await create_validation(session, context, project_id, file, target)


async def get_validation(
    session: AsyncSession, project_id: str, file_id: str, validation_id: str
) -> ValidationReport:
    row = await ValidationRepository(session, project_id).get(validation_id)
    if row is None or row.file_id != file_id:
        raise NotFound(f"No validation {validation_id} for file {file_id}.", param="validation_id")
    return row


async def cancel_validation(
    session: AsyncSession, project_id: str, file_id: str, validation_id: str
) -> ValidationReport:
    row = await get_validation(session, project_id, file_id, validation_id)
    if row.status == "queued":
        row.status = "cancelled"
        row.finished_at = utcnow()
    elif row.status == "running":
        # The worker sees the flag at its next progress report and stops there.
        row.cancel_requested = True
    elif row.status != "cancelled":
        raise Conflict(f"Validation {validation_id} has already {row.status}.")
    await session.flush()
    return row


async def latest_summaries(
    session: AsyncSession, project_id: str, file_ids: list[str]
) -> dict[str, ValidationReport]:
    return await ValidationRepository(session, project_id).latest_per_file(file_ids)


# --- estimates ----------------------------------------------------------------------------------


def _hyperparameters(body: EstimateCreate) -> Hyperparameters | None:
    """The hyperparameters asked for, refused as job creation (`jobs.service`) refuses them,
    so that an estimate is never given for a job that could not be created."""
    nested = None
    method = body.method.type if body.method is not None else "supervised"
    if body.method is not None:
        details = body.method.supervised if method == "supervised" else body.method.dpo
        nested = details.hyperparameters if details is not None else None
        unused = "dpo" if method == "supervised" else "supervised"
        if getattr(body.method, unused) is not None:
            raise InvalidPayload(
                f"method.type is '{method}' but method.{unused} was given.", param="method"
            )
    if nested is not None and body.hyperparameters is not None:
        raise InvalidPayload(
            "Give hyperparameters either at the top level or in method, not both.",
            param="hyperparameters",
        )
    chosen = nested or body.hyperparameters
    if method == "supervised" and chosen is not None and chosen.beta is not None:
        raise InvalidPayload("beta applies to the dpo method only.", param="hyperparameters.beta")
    return chosen


async def report_for_target(
    session: AsyncSession,
    context: ValidationContext,
    project_id: str,
    file_id: str,
    target: Target,
    param: str,
) -> ValidationReport:
    # Reads in a short session of their own, so that a queued report below is committed
    # before this request's unit of work begins (and is rolled back by the 409).
    async with context.sessionmaker() as reader:
        try:
            file = await files.get_file(reader, project_id, file_id)
        except NotFound:
            raise NotFound(f"No such File object: {file_id}", param=param) from None
        repository = ValidationRepository(reader, project_id)
        existing = await repository.latest_succeeded(file.id, target.model.id, target.method)
        row = await repository.latest_unfinished(file.id, target.model.id, target.method)
    if existing is not None:
        return existing
    if row is None and file.bytes <= context.settings.validation.inline_max_bytes:
        row = await create_validation(session, context, project_id, file, target)
    elif row is None:
        # Queued in its own committed transaction: this request answers 409 (which rolls its
        # own unit of work back), and the report must still be there to poll.
        async with context.sessionmaker() as own, own.begin():
            row = await create_validation(own, context, project_id, file, target)
    if row.status != "succeeded":
        raise Conflict(
            f"File {file_id} is being validated ({row.id}, status {row.status}); ask again when "
            f"GET /v1/files/{file_id}/validations/{row.id} says succeeded.",
            param=param,
            code="validation_pending",
        )
    return row


async def estimate(
    session: AsyncSession, context: ValidationContext, project_id: str, body: EstimateCreate
) -> Estimate:
    method = body.method.type if body.method is not None else "supervised"
    # The model first, as job creation does: an unknown model is a 404 whatever else is wrong.
    resolve_target(context.settings, body.model, method)
    hyper = _hyperparameters(body)
    # The range (1..50) is checked by the Hyperparameters schema.
    n_epochs = hyper.n_epochs if hyper is not None and isinstance(hyper.n_epochs, int) else None
    target = resolve_target(context.settings, body.model, method, n_epochs)
    training = await report_for_target(
        session, context, project_id, body.training_file, target, "training_file"
    )
    validation = None
    if body.validation_file is not None:
        validation = await report_for_target(
            session, context, project_id, body.validation_file, target, "validation_file"
        )
    report = training.report or {}
    examples = int(report.get("examples") or 0)
    per_epoch = int((report.get("tokens") or {}).get("billable_per_epoch") or 0)
    # Recomputed rather than read from the report: the report may be for other epochs.
    cost = cost_report(target, examples, per_epoch, usd_digits=4)
    return Estimate(
        model=target.model.id,
        method=method,
        training_file=body.training_file,
        validation_file=body.validation_file,
        n_epochs=cost["n_epochs"],
        n_epochs_source=cost["n_epochs_source"],
        examples=examples,
        trained_tokens=cost["billable_tokens"],
        estimated_cost_usd=cost["usd"],
        usd_per_1m_tokens=cost["usd_per_1m"],
        price_date=cost["price_date"],
        expected_duration_seconds=None,
        verdict=training.verdict,
        training_validation_id=training.id,
        validation_validation_id=None if validation is None else validation.id,
    )
