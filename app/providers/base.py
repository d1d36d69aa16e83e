"""The provider interface: what tunegate needs from a fine-tuning backend, and its errors.

A provider (OpenAI, the local trainer …) uploads training files, runs jobs, reports their
events and checkpoints, deletes tuned models, serves chat completions and lists the base
models it can tune. Callers (the submitter, the syncer, the inference proxy) see only this
module: the dataclasses below instead of SDK objects, and one error hierarchy in which every
class says once whether the failure is worth retrying (`ProviderError.retryable`), so no
caller re-derives it from status codes.

Errors are shaped after OpenAI's: `message`, `code` and `param` are the provider's own (the
job's failure reason shown to users); `status` is the upstream HTTP status when there was one;
`retry_after` is how long the provider asked us to wait (`Retry-After` / `retry-after-ms`).
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, ClassVar

from app.kit.upstream import UpstreamResponse

__all__ = [
    "BaseModelInfo",
    "Provider",
    "ProviderAuthError",
    "ProviderBadRequest",
    "ProviderCheckpoint",
    "ProviderConnectionError",
    "ProviderError",
    "ProviderEvent",
    "ProviderJob",
    "ProviderNotFound",
    "ProviderNotSupported",
    "ProviderPermissionDenied",
    "ProviderRateLimited",
    "ProviderServerError",
    "ProviderTimeout",
    "retry_after_seconds",
]

# A provider asking for more than a day is not asking for a retry; ignore such a value.
MAX_RETRY_AFTER_SECONDS = 24 * 3600.0


class ProviderError(Exception):
    """A provider call failed. `retryable` says whether the same call may succeed later."""

    retryable: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        param: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.param = param
        self.retry_after = retry_after

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.message!r}, status={self.status!r}, "
            f"code={self.code!r}, param={self.param!r}, retry_after={self.retry_after!r})"
        )


class ProviderConnectionError(ProviderError):
    """The provider could not be reached, or the connection broke before an answer."""

    retryable = True


class ProviderTimeout(ProviderError):
    """No answer within the configured timeout."""

    retryable = True


class ProviderRateLimited(ProviderError):
    """429: wait `retry_after` seconds (when the provider said) and try again."""

    retryable = True


class ProviderServerError(ProviderError):
    """5xx, 408, or 409 (a lock conflict upstream): the provider's trouble, not the request's."""

    retryable = True


class ProviderBadRequest(ProviderError):
    """400/422 (and other 4xx without a class of their own): the request itself is refused."""


class ProviderAuthError(ProviderError):
    """401: the provider's credentials are missing, wrong or revoked."""


class ProviderPermissionDenied(ProviderError):
    """403, e.g. code `training_not_available` for an account that lost fine-tuning access."""


class ProviderNotFound(ProviderError):
    """404: the job, file or model does not exist at the provider (or not for this account)."""


class ProviderNotSupported(ProviderError):
    """The provider cannot do this at all (pausing a job on a provider without pauses …)."""


@dataclass(frozen=True)
class ProviderJob:
    """A fine-tuning job as the provider reports it; `raw` is the provider's whole object."""

    id: str
    status: str
    model: str
    fine_tuned_model: str | None
    trained_tokens: int | None
    error: dict[str, Any] | None
    result_files: list[str]
    created_at: int
    finished_at: int | None
    estimated_finish: int | None
    hyperparameters: dict[str, Any]
    method: dict[str, Any] | None
    metadata: dict[str, str] | None
    raw: dict[str, Any]


@dataclass(frozen=True)
class ProviderEvent:
    id: str
    created_at: int
    level: str
    message: str
    type: str | None
    data: dict[str, Any] | None


@dataclass(frozen=True)
class ProviderCheckpoint:
    id: str
    created_at: int
    fine_tuned_model_checkpoint: str
    step_number: int
    metrics: dict[str, Any]


@dataclass(frozen=True)
class BaseModelInfo:
    """A base model the provider can tune: limits, price, methods and retirement date."""

    id: str
    context_limit: int | None
    training_usd_per_1m: float | None
    methods: tuple[str, ...]
    shutdown_date: str | None


class Provider(ABC):
    """One fine-tuning backend. Methods raise `ProviderError` subclasses, nothing else upstream.

    Implementations hold one long-lived HTTP client, created in `__init__` and closed by
    `aclose`; they do not retry on their own (the caller decides from `retryable`).
    """

    name: ClassVar[str]
    supports_pause: ClassVar[bool]

    @abstractmethod
    async def upload_file(self, filename: str, path: Path, purpose: str = "fine-tune") -> str:
        """Upload the file at `path` under `filename`, streamed from disk; the provider's id."""

    async def download_file(self, file_id: str, limit: int) -> tuple[str, bytes]:
        """A provider file's name and content (a job's result file), at most `limit` bytes."""
        raise ProviderNotSupported(f"The {self.name} provider cannot download files.")

    @abstractmethod
    async def create_job(
        self,
        *,
        model: str,
        training_file: str,
        validation_file: str | None,
        method: dict[str, Any] | None,
        hyperparameters: dict[str, Any] | None,
        suffix: str | None,
        seed: int | None,
        metadata: dict[str, str],
        idempotency_key: str | None = None,
    ) -> ProviderJob:
        """Create a job. Tag it in `metadata` so `find_job_by_metadata` finds it after a retry."""

    @abstractmethod
    async def find_job_by_metadata(self, key: str, value: str) -> ProviderJob | None:
        """The newest job whose `metadata[key] == value`, or None."""

    @abstractmethod
    async def retrieve_job(self, job_id: str) -> ProviderJob: ...

    @abstractmethod
    async def cancel_job(self, job_id: str) -> ProviderJob: ...

    async def pause_job(self, job_id: str) -> ProviderJob:
        """Pause a running job; `ProviderNotSupported` unless `supports_pause`."""
        raise ProviderNotSupported(f"The {self.name} provider cannot pause jobs.")

    async def resume_job(self, job_id: str) -> ProviderJob:
        """Resume a paused job; `ProviderNotSupported` unless `supports_pause`."""
        raise ProviderNotSupported(f"The {self.name} provider cannot resume jobs.")

    @abstractmethod
    async def list_events(
        self, job_id: str, after: str | None = None, limit: int = 100
    ) -> list[ProviderEvent]:
        """At most `limit` events newer than the event `after`, oldest first.

        With more than `limit` new events, the oldest ones come first, so passing the last id
        returned as the next `after` reads every event exactly once.
        """

    @abstractmethod
    async def list_checkpoints(
        self, job_id: str, after: str | None = None, limit: int = 100
    ) -> list[ProviderCheckpoint]:
        """At most `limit` checkpoints newer than the checkpoint `after`, oldest first."""

    @abstractmethod
    async def delete_model(self, model_id: str) -> None: ...

    @abstractmethod
    async def chat_completion(
        self, body: dict[str, Any], *, wait_seconds: float | None = None
    ) -> dict[str, Any]:
        """A non-streamed chat completion; `body` is OpenAI's request body, passed through.
        `wait_seconds` bounds the wait for the provider when given."""

    @abstractmethod
    def stream_chat_completion(
        self, body: dict[str, Any], *, wait_seconds: float | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """Streamed chunks as dicts (`wait_seconds`: for the answer, and between chunks). The
        request is sent on the first iteration (so errors before any chunk surface there);
        closing the iterator closes the upstream request."""

    async def completion(
        self, body: dict[str, Any], *, wait_seconds: float | None = None
    ) -> dict[str, Any]:
        """A non-streamed legacy completion (`/v1/completions`, prompt in, text out)."""
        raise ProviderNotSupported(f"The {self.name} provider does not serve /v1/completions.")

    async def stream_completion(
        self, body: dict[str, Any], *, wait_seconds: float | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """Streamed legacy completion chunks, as `stream_chat_completion` streams chat ones."""
        raise ProviderNotSupported(f"The {self.name} provider does not serve /v1/completions.")
        yield {}  # an async generator, like the implementations

    # Providers that speak OpenAI's HTTP API for completions take the inference proxy's fast
    # path: the caller's request bytes go to `forward` as they are, the answer's bytes come
    # back as they are. The others serve completions through the dict methods above.
    forwards_raw: ClassVar[bool] = False

    async def forward(
        self, path: str, body: bytes, *, wait_seconds: float | None = None
    ) -> UpstreamResponse:
        """POST OpenAI-shaped request bytes to `path` ("/chat/completions", "/completions");
        the answer once its head is in, whatever its status (`answer_error` reads a failed
        one). Raises `ProviderError` when there is no answer."""
        raise ProviderNotSupported(f"The {self.name} provider does not forward requests.")

    def answer_error(self, status: int, body: bytes, headers: Mapping[str, str]) -> ProviderError:
        """The `ProviderError` a forwarded request's non-2xx answer stands for."""
        return ProviderServerError(f"The {self.name} provider answered HTTP {status}.")

    def stream_error(self, error: Any) -> ProviderError:
        """The `ProviderError` for an `{"error": ...}` event in a forwarded stream (the
        provider's trouble, whatever it says), its message cleared of secrets."""
        return ProviderServerError(f"The {self.name} provider's stream failed.")

    @abstractmethod
    async def list_base_models(self) -> list[BaseModelInfo]: ...

    @abstractmethod
    async def aclose(self) -> None:
        """Release the provider's HTTP client. Idempotent."""


def retry_after_seconds(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """How long a response asks us to wait: `retry-after-ms` (OpenAI's, more precise), else
    `Retry-After` in seconds or as an HTTP date. None when absent, invalid or absurd.

    `headers` should be case-insensitive (httpx/httpx2 `Headers`); lower-case names are used.
    """
    seconds = _requested_wait(headers, now)
    if seconds is not None and math.isfinite(seconds) and 0 <= seconds <= MAX_RETRY_AFTER_SECONDS:
        return seconds
    return None


def _requested_wait(headers: Mapping[str, str], now: float | None) -> float | None:
    """The first of the headers that parses, in seconds, however large or small."""
    milliseconds = headers.get("retry-after-ms")
    if milliseconds is not None:
        try:
            return float(milliseconds) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))
