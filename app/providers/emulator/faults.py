"""Switchable faults: what can go wrong upstream, on demand.

Counted faults (`rate_limit`, `server_error`, `drop_connection`) hit the next N requests and
then stop; `slow_seconds` delays every request until cleared; `training_not_available` makes
every job creation answer 403 until cleared; `outage` makes every API request answer 503 until
cleared (a provider that is down for minutes). They are set at start (`--fault NAME[=VALUE]`) or
at run time with `POST /_emulator/faults` and cleared with `DELETE /_emulator/faults`.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, fields, replace
from enum import Enum
from typing import Any

from app.providers.emulator.errors import EmulatorError, bad_request, rate_limited, server_error

DEFAULT_SLOW_SECONDS = 2.0
SWITCHES = frozenset({"training_not_available", "outage"})
"""Faults that are on or off (booleans) rather than counted."""


@dataclass
class FaultConfig:
    """Faults to inject. Counts are "the next N requests"; zero means off."""

    rate_limit: int = 0
    server_error: int = 0
    slow_seconds: float = 0.0
    drop_connection: int = 0
    training_not_available: bool = False
    outage: bool = False

    @classmethod
    def from_cli(cls, specs: list[str]) -> FaultConfig:
        """Parse repeated `--fault NAME[=VALUE]` options (`rate_limit=3`, `slow=1.5` ...)."""
        config = cls()
        for spec in specs:
            name, _, value = spec.partition("=")
            name = name.strip().replace("-", "_")
            if name == "slow":
                name = "slow_seconds"
            known = {f.name for f in fields(cls)}
            if name not in known:
                raise ValueError(
                    f"unknown fault {spec!r}; choose from rate_limit=N, server_error=N, "
                    "drop_connection=N, slow=SECONDS, training_not_available, outage"
                )
            default: Any = 1  # a counted fault: the next request
            if name in SWITCHES:
                default = True
            elif name == "slow_seconds":
                default = DEFAULT_SLOW_SECONDS
            try:
                config.update({name: _parse_cli_value(value, default) if value else default})
            except (ValueError, EmulatorError) as exc:
                reason = exc.message if isinstance(exc, EmulatorError) else str(exc)
                raise ValueError(f"invalid fault {spec!r}: {reason}") from None
        return config

    def update(self, changes: dict[str, Any]) -> None:
        """Apply a partial change (the JSON of `POST /_emulator/faults`), checking types."""
        known = {f.name for f in fields(self)}
        for name, value in changes.items():
            if name not in known:
                raise bad_request(f"Unknown fault '{name}'.", param=name, code="unknown_parameter")
            if name in SWITCHES:
                if not isinstance(value, bool):
                    raise bad_request(f"'{name}' must be a boolean.", param=name)
                setattr(self, name, value)
            elif name == "slow_seconds":
                if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                    raise bad_request(f"'{name}' must be a number >= 0.", param=name)
                self.slow_seconds = float(value)
            else:
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise bad_request(f"'{name}' must be an integer >= 0.", param=name)
                setattr(self, name, value)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _parse_cli_value(value: str, default: Any) -> Any:
    if isinstance(default, bool):
        if value.lower() in {"1", "true", "yes", "on"}:
            return True
        if value.lower() in {"0", "false", "no", "off"}:
            return False
        raise ValueError("expected true or false")
    try:
        return float(value) if isinstance(default, float) else int(value)
    except ValueError:
        kind = "a number" if isinstance(default, float) else "an integer"
        raise ValueError(f"expected {kind}") from None


class Fault(Enum):
    """The fault chosen for one request."""

    drop_connection = "drop_connection"
    rate_limit = "rate_limit"
    server_error = "server_error"


class FaultState:
    """The live fault settings, shared by the event loop and whoever changes them."""

    def __init__(self, config: FaultConfig | None = None) -> None:
        self._lock = threading.Lock()
        self._config = replace(config or FaultConfig())

    def snapshot(self) -> FaultConfig:
        with self._lock:
            return replace(self._config)

    def update(self, changes: dict[str, Any]) -> FaultConfig:
        with self._lock:
            candidate = replace(self._config)
            candidate.update(changes)  # raises before anything changes
            self._config = candidate
            return replace(candidate)

    def clear(self) -> FaultConfig:
        with self._lock:
            self._config = FaultConfig()
            return FaultConfig()

    def take(self) -> Fault | None:
        """Consume one counted fault for this request, the most disruptive first."""
        with self._lock:
            for fault in Fault:
                remaining: int = getattr(self._config, fault.value)
                if remaining > 0:
                    setattr(self._config, fault.value, remaining - 1)
                    return fault
        return None

    def slow_seconds(self) -> float:
        with self._lock:
            return self._config.slow_seconds

    def training_not_available(self) -> bool:
        with self._lock:
            return self._config.training_not_available

    def outage(self) -> bool:
        with self._lock:
            return self._config.outage


def fault_error(fault: Fault) -> EmulatorError | None:
    """The error answer of a counted fault (None for a dropped connection: no answer at all)."""
    if fault is Fault.rate_limit:
        return rate_limited()
    if fault is Fault.server_error:
        return server_error()
    return None
