"""`tunegate emulator`: serve the OpenAI emulator on loopback for development and tests.

`--speed` scales the job clock (10 → ten times faster); `--fault NAME[=VALUE]` (repeatable)
starts with faults switched on: `rate_limit=N`, `server_error=N`, `drop_connection=N` (the next
N requests), `slow=SECONDS`, `training_not_available`, `outage`. Faults can be changed later
through `POST /_emulator/faults` and cleared with `DELETE /_emulator/faults`.

`--webhook-url` (and `--webhook-secret` to sign them) sends OpenAI's `fine_tuning.job.*` webhooks
when jobs finish; `POST /_emulator/webhooks` changes that at run time.
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
            "drop_connection=N, slow=SECONDS, training_not_available, outage. Repeatable."
        ),
    ] = [],  # noqa: B006 - typer reads the default, it is never mutated
    webhook_url: Annotated[
        str | None,
        typer.Option(help="Send fine_tuning.job.* webhooks to this URL when jobs finish."),
    ] = None,
    webhook_secret: Annotated[
        str | None,
        typer.Option(help="Sign webhooks with this secret (whsec_<base64> or any string)."),
    ] = None,
) -> None:
    """Run an OpenAI-compatible emulator (files, fine-tuning jobs, models, chat completions)."""
    import uvicorn

    from app.providers.emulator.app import create_emulator_app
    from app.providers.emulator.faults import FaultConfig
    from app.providers.emulator.webhooks import InvalidWebhookTarget

    if speed <= 0:
        raise typer.BadParameter("must be > 0", param_hint="--speed")
    try:
        faults = FaultConfig.from_cli(fault)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--fault") from None
    try:
        app = create_emulator_app(
            speed=speed, faults=faults, webhook_url=webhook_url, webhook_secret=webhook_secret
        )
    except InvalidWebhookTarget as exc:
        option = "--webhook-secret" if exc.param == "secret" else "--webhook-url"
        raise typer.BadParameter(str(exc), param_hint=option) from None
    typer.echo(f"OpenAI emulator on http://{host}:{port}/v1 (speed {speed:g})", err=True)
    if webhook_url is not None:
        signed = "signed" if webhook_secret is not None else "unsigned"
        typer.echo(f"Webhooks ({signed}) to {webhook_url}", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", server_header=False)
