"""Builds the configured providers once per process and closes them at shutdown.

`openai` is present only when `OPENAI_API_KEY` is set; its base URL, organization and project
come from the other `OPENAI_*` settings (see README, Configuration).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from app.config import Settings
from app.providers.base import Provider
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
    return providers


async def close_providers(providers: Mapping[str, Provider]) -> None:
    """Close every provider; one failing to close does not keep the others open."""
    await asyncio.gather(*(p.aclose() for p in providers.values()), return_exceptions=True)
