"""`tunegate emulator`: serve the OpenAI emulator on loopback for development and tests.

`--speed` scales the job clock (10 → ten times faster); `--fault NAME[=VALUE]` (repeatable)
starts with faults switched on: `rate_limit=N`, `server_error=N`, `drop_connection=N` (the next
N requests), `slow=SECONDS`, `training_not_available`. Faults can be changed later through
`POST /_emulator/faults` and cleared with `DELETE /_emulator/faults`.
"""

from __future__ import annotations

from typing import Annotated

import typer


def emulator(
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8001,
    host: Annotated[str, typer.Option(help="Bind address.")] = "127.0.0.1",
    speed: Annotated[
        float, typer.Option(help="Job clock multiplier: 10 runs jobs ten times faster.")
    ] = 1.0,
    fault: Annotated[
        list[str],
        typer.Option(
            help="Fault to start with, NAME[=VALUE]: rate_limit=N, server_error=N, "
            "drop_connection=N, slow=SECONDS, training_not_available. Repeatable."
        ),
    ] = [],  # noqa: B006 - typer reads the default, it is never mutated
) -> None:
    """Run an OpenAI-compatible emulator (files, fine-tuning jobs, models, chat completions)."""
    import uvicorn

    from app.providers.emulator.app import create_emulator_app
    from app.providers.emulator.faults import FaultConfig

    if speed <= 0:
        raise typer.BadParameter("must be > 0", param_hint="--speed")
    try:
        faults = FaultConfig.from_cli(fault)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--fault") from None
    app = create_emulator_app(speed=speed, faults=faults)
    typer.echo(f"OpenAI emulator on http://{host}:{port}/v1 (speed {speed:g})", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", server_header=False)
