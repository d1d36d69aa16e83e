"""How a caller of tunegate's API sees a provider's failure, in OpenAI's envelope — one mapping
for every endpoint that calls a provider (job cancel/pause/resume, model deletion, inference).

429 keeps its Retry-After; a timeout is 504 `upstream_timeout`; a provider that fails or cannot
be reached is 502 `upstream_error` (502 `upstream_auth_failed` when it refuses tunegate's own
credentials: an operator must act); a refused request is 400 with the provider's message and
code; 403 stays 403; something it does not know is 404.
"""

from __future__ import annotations

import math

from app.kit.errors import (
    APIError,
    BadGateway,
    BadRequest,
    GatewayTimeout,
    NotFound,
    PermissionDenied,
    RateLimited,
    ServiceUnavailable,
)
from app.providers.base import (
    ProviderAuthError,
    ProviderBadRequest,
    ProviderError,
    ProviderNotFound,
    ProviderNotSupported,
    ProviderPermissionDenied,
    ProviderRateLimited,
    ProviderTimeout,
)


def as_api_error(exc: ProviderError, action: str) -> APIError:
    """`action` names what was asked ("cancel the job", "chat completion") in the message."""
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, ProviderRateLimited):
        headers = {}
        if exc.retry_after is not None:
            headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
        return RateLimited(
            f"The provider is rate limiting requests ({action}): {detail}",
            code=exc.code or "rate_limit_exceeded",
            headers=headers,
        )
    if isinstance(exc, ProviderTimeout):
        return GatewayTimeout(f"The provider did not answer in time ({action}): {detail}")
    if isinstance(exc, ProviderNotFound):
        return NotFound(
            f"The provider does not know it ({action}): {detail}",
            code=exc.code or "not_found_at_provider",
        )
    if isinstance(exc, ProviderBadRequest | ProviderNotSupported):
        return BadRequest(
            f"The provider refused it ({action}): {detail}",
            param=exc.param,
            code=exc.code or "refused_by_provider",
        )
    if isinstance(exc, ProviderPermissionDenied):
        return PermissionDenied(
            f"The provider refused it ({action}): {detail}",
            code=exc.code or "provider_permission_denied",
        )
    if isinstance(exc, ProviderAuthError):
        return BadGateway(
            "The provider refused tunegate's credentials; an operator must fix its API key.",
            code="upstream_auth_failed",
        )
    return BadGateway(f"The provider failed ({action}): {detail}")


def provider_not_configured(provider: str, of: str) -> ServiceUnavailable:
    return ServiceUnavailable(
        f"The provider '{provider}' of {of} is not configured on this deployment.",
        code="provider_not_configured",
    )
