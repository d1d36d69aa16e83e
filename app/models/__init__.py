"""Every ORM model, one module per table, imported here so Alembic sees one metadata."""

from app.models.alias import ModelAlias
from app.models.api_key import ApiKey, Scope
from app.models.blob import Blob
from app.models.eval import Eval, EvalExample, EvalResult
from app.models.feedback import Feedback
from app.models.file import File
from app.models.idempotency_key import IdempotencyKey
from app.models.job import (
    Job,
    JobCheckpoint,
    JobEvent,
    JobMetric,
    ProviderFile,
    ProviderRateBudget,
    ProviderWebhookReceipt,
)
from app.models.model import FineTunedModel, ProviderBaseModel
from app.models.project import Project
from app.models.upload import Upload, UploadPart
from app.models.usage import UsageRecord
from app.models.validation_report import ValidationReport
from app.models.webhook import WebhookAttempt, WebhookDelivery, WebhookEndpoint, WebhookEvent

__all__ = [
    "ApiKey",
    "Blob",
    "Eval",
    "EvalExample",
    "EvalResult",
    "Feedback",
    "File",
    "FineTunedModel",
    "IdempotencyKey",
    "Job",
    "JobCheckpoint",
    "JobEvent",
    "JobMetric",
    "ModelAlias",
    "Project",
    "ProviderBaseModel",
    "ProviderFile",
    "ProviderRateBudget",
    "ProviderWebhookReceipt",
    "Scope",
    "Upload",
    "UploadPart",
    "UsageRecord",
    "ValidationReport",
    "WebhookAttempt",
    "WebhookDelivery",
    "WebhookEndpoint",
    "WebhookEvent",
]
