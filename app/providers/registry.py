"""Builds the configured providers once per process and closes them at shutdown.

`openai` is present only when `OPENAI_API_KEY` is set; its base URL, organization and project
come from the other `OPENAI_*` settings (see README, Configuration). `local` is present when its
libraries are installed (the `local` extra) and `TUNEGATE_LOCAL__ENABLED` is not `off`; its
base models are registered in the catalog here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from app.config import Settings
from app.providers.base import Provider
from app.providers.local import models as local_models
from app.providers.openai import OpenAIProvider


def build_providers(settings: Settings) -> dict[str, Provider]:
    providers: dict[str, Provider] = {}
    if settings.openai_api_key is not None and settings.openai_api_key.get_secret_value():
        providers[OpenAIProvider.name] = OpenAIProvider(
            api_key=settings.openai_api_key.get_secret_value(),
            base_url=settings.openai_base_url or None,
            organization=settings.openai_organization,
            project=settings.openai_project,
        )
    if local_models.enabled(settings):
        from app.providers.local.provider import LocalProvider

        local_models.register(settings)
        providers[LocalProvider.name] = LocalProvider(settings)
    return providers


async def close_providers(providers: Mapping[str, Provider]) -> None:
    """Close every provider; one failing to close does not keep the others open."""
    await asyncio.gather(*(p.aclose() for p in providers.values()), return_exceptions=True)
