"""An in-memory OpenAI emulator: files, fine-tuning jobs, models and chat completions.

Used by tunegate's tests (the `openai` provider is driven through the real SDK against it over
loopback) and by developers (`tunegate emulator --port 8001`) to integrate without spending
money. Jobs advance with the wall clock scaled by `speed`; faults are switchable at run time.

The names below are imported on first use, so `tunegate --help` does not pay for FastAPI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.providers.emulator.app import create_emulator_app
    from app.providers.emulator.faults import FaultConfig

__all__ = ["FaultConfig", "create_emulator_app"]


def __getattr__(name: str) -> Any:
    if name == "create_emulator_app":
        from app.providers.emulator.app import create_emulator_app

        return create_emulator_app
    if name == "FaultConfig":
        from app.providers.emulator.faults import FaultConfig

        return FaultConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
