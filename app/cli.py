"""The `tunegate` command: serve, migrate, worker, keys, files."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer
from rich.console import Console
from rich.table import Column, Table
from sqlalchemy.ext.asyncio import AsyncSession

from app import __version__
from app.config import LogFormat, LogSettings, Settings
from app.kit.logging import configure_logging
from app.models import Scope
from app.providers.emulator.cli import emulator

if TYPE_CHECKING:
    from app.models import ApiKey

T = TypeVar("T")

cli = typer.Typer(
    name="tunegate",
    help="Self-hosted, OpenAI-compatible control plane for fine-tuning LLMs.",
    no_args_is_help=True,
    add_completion=False,
)
keys_cli = typer.Typer(help="Create, list and revoke API keys.", no_args_is_help=True)
cli.add_typer(keys_cli, name="keys")
cli.command()(emulator)
files_cli = typer.Typer(help="Upload and list files on a running tunegate.", no_args_is_help=True)
cli.add_typer(files_cli, name="files")

err = Console(stderr=True)


def _settings() -> Settings:
    try:
        return Settings()
    except Exception as exc:  # pydantic's message says which variable is wrong
        err.print(f"[red]Invalid configuration:[/red] {exc}")
        raise typer.Exit(2) from None


def _database_url(settings: Settings) -> str:
    from app.db.engine import resolve_database_url

    return resolve_database_url(settings)


def _migrate(url: str) -> None:
    from app.db.migrate import upgrade_to_head

    upgrade_to_head(url)


def _quiet_logging(settings: Settings) -> None:
    configure_logging(LogSettings(level="WARNING", format=LogFormat.console))


def _with_session(settings: Settings, work: Callable[[AsyncSession], Awaitable[T]]) -> T:
    """Run `work` in one committed transaction (migrating first in development)."""
    from app.db.engine import Database, create_engine

    url = _database_url(settings)
    if not settings.is_production:
        _migrate(url)

    async def run() -> T:
        database = Database(create_engine(url, settings))
        try:
            async with database.sessionmaker() as session, session.begin():
                return await work(session)
        finally:
            await database.dispose()

    return asyncio.run(run())


@cli.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


@cli.command()
def migrate() -> None:
    """Apply every pending database migration."""
    settings = _settings()
    configure_logging(settings.log)
    _migrate(_database_url(settings))
    err.print("[green]database schema is at the latest migration[/green]")


def _graceful_server_class() -> type:
    import signal
    import threading
    from collections.abc import Iterator
    from contextlib import contextmanager

    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn re-raises SIGTERM after its graceful shutdown, so the process would end
        "killed by signal". A finished graceful stop is a clean exit (status 0) here."""

        @contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {
                sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)
            }
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return GracefulServer


@cli.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (TUNEGATE_SERVER__HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (TUNEGATE_SERVER__PORT).")] = None,
    no_workers: Annotated[
        bool, typer.Option("--no-workers", help="API only; run `tunegate worker` elsewhere.")
    ] = False,
    migrate: Annotated[
        bool | None,
        typer.Option(
            "--migrate/--no-migrate", help="Apply migrations first (default: in development)."
        ),
    ] = None,
) -> None:
    """Start the HTTP API (and, unless --no-workers, every worker role) in this process."""
    import uvicorn

    from app.main import create_app

    settings = _settings()
    configure_logging(settings.log)
    if migrate if migrate is not None else not settings.is_production:
        _migrate(_database_url(settings))
    app = create_app(settings, run_workers=not no_workers)
    config = uvicorn.Config(
        app,
        host=host or settings.server.host,
        port=port or settings.server.port,
        log_config=None,
        access_log=False,
        proxy_headers=True,
        server_header=False,
        timeout_graceful_shutdown=max(1, round(settings.server.graceful_shutdown.total_seconds())),
    )
    _graceful_server_class()(config).run()


@cli.command()
def worker(
    role: Annotated[
        list[str] | None,
        typer.Option("--role", help="Role to run; repeat for several. Default: all."),
    ] = None,
) -> None:
    """Run background worker roles (no HTTP API)."""
    from app.db.engine import Database, create_engine
    from app.workers.runner import ROLES, WorkerContext, WorkerRunner

    settings = _settings()
    configure_logging(settings.log)
    roles = role or sorted(ROLES)
    url = _database_url(settings)

    async def run() -> None:
        import signal

        database = Database(create_engine(url, settings))
        try:
            runner = WorkerRunner(WorkerContext(settings, database), roles)
        except ValueError as exc:
            err.print(f"[red]{exc}[/red]")
            raise typer.Exit(2) from None
        runner.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await runner.stop(settings.server.graceful_shutdown.total_seconds())
        await database.dispose()

    asyncio.run(run())


@keys_cli.command("create")
def keys_create(
    project: Annotated[str, typer.Option(help="Project name (created if missing) or id.")],
    scope: Annotated[Scope, typer.Option(help="admin, write or read.")] = Scope.write,
    name: Annotated[str | None, typer.Option(help="A label for people.")] = None,
) -> None:
    """Create an API key and print it once (on stdout, alone, for scripts)."""
    from app.auth import service as auth
    from app.kit.errors import APIError
    from app.projects import service as projects

    settings = _settings()
    _quiet_logging(settings)

    async def work(session: AsyncSession) -> tuple[str, str, str]:
        if project.startswith("proj_"):
            target = await projects.get(session, project)
        else:
            target = await projects.get_or_create(session, project)
        row, plaintext = await auth.create_key(session, target, scope, name)
        return plaintext, row.id, target.name

    try:
        plaintext, key_id, project_name = _with_session(settings, work)
    except APIError as exc:
        err.print(f"[red]{exc.message}[/red]")
        raise typer.Exit(1) from None
    err.print(
        f"Created {scope.value} key {key_id} for project '{project_name}'. "
        "It is shown only now; store it safely:"
    )
    typer.echo(plaintext)


@keys_cli.command("revoke")
def keys_revoke(
    prefix: Annotated[str, typer.Argument(help="The key's visible prefix, its id, or the key.")],
) -> None:
    """Revoke a key: it answers 401 from now on."""
    from app.auth import service as auth
    from app.kit.errors import APIError

    settings = _settings()
    _quiet_logging(settings)

    async def work(session: AsyncSession) -> str:
        key = await auth.revoke_key(session, await auth.find_one_key(session, prefix))
        return key.id

    try:
        key_id = _with_session(settings, work)
    except APIError as exc:
        err.print(f"[red]{exc.message}[/red]")
        raise typer.Exit(1) from None
    err.print(f"Revoked key {key_id}.")


@keys_cli.command("list")
def keys_list(
    project: Annotated[str | None, typer.Option(help="Only this project (name or id).")] = None,
) -> None:
    """List keys (visible prefixes only)."""
    from app.auth.repository import ApiKeyLookup
    from app.kit.errors import APIError
    from app.projects import service as projects

    settings = _settings()
    _quiet_logging(settings)

    async def work(session: AsyncSession) -> list[tuple[ApiKey, str]]:
        project_id = None
        if project is not None:
            project_id = (await projects.get_by_id_or_name(session, project)).id
        return await ApiKeyLookup(session).all_with_project_names(project_id)

    try:
        rows = _with_session(settings, work)
    except APIError as exc:
        err.print(f"[red]{exc.message}[/red]")
        raise typer.Exit(1) from None
    table = Table("project", "scope", "created", "last used", "revoked")
    table.columns[0:0] = [Column("id", no_wrap=True), Column("prefix", no_wrap=True)]
    for key, project_name in rows:
        table.add_row(
            key.id,
            key.prefix,
            project_name,
            key.scope,
            f"{key.created_at:%Y-%m-%d %H:%M}",
            f"{key.last_used_at:%Y-%m-%d %H:%M}" if key.last_used_at else "-",
            f"{key.revoked_at:%Y-%m-%d %H:%M}" if key.revoked_at else "-",
        )
    Console().print(table)


BaseUrlOption = Annotated[
    str,
    typer.Option(
        "--base-url", envvar="TUNEGATE_URL", help="Where tunegate answers (env TUNEGATE_URL)."
    ),
]
ApiKeyOption = Annotated[
    str,
    typer.Option(
        "--api-key", envvar="TUNEGATE_API_KEY", help="A tunegate key (env TUNEGATE_API_KEY)."
    ),
]


@files_cli.command("upload")
def files_upload(
    path: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)],
    api_key: ApiKeyOption,
    purpose: Annotated[str, typer.Option(help="fine-tune, batch, evals, ...")] = "fine-tune",
    base_url: BaseUrlOption = "http://127.0.0.1:8000",
) -> None:
    """Upload a file with a progress bar (files over 512 MB go through the Uploads API)."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    from app.files.client import TunegateClient, TunegateError

    client = TunegateClient(base_url, api_key)
    columns = (
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
    )
    try:
        with Progress(*columns, console=err) as progress:
            task = progress.add_task(path.name, total=path.stat().st_size)
            created = client.upload(path, purpose, lambda n: progress.advance(task, n))
    except TunegateError as exc:
        err.print(f"[red]{exc.message}[/red]")
        raise typer.Exit(1) from None
    except OSError as exc:
        err.print(f"[red]Cannot reach tunegate at {base_url}: {exc}[/red]")
        raise typer.Exit(1) from None
    finally:
        client.close()
    err.print(
        f"{created['id']}: {created['bytes']} bytes, format {created.get('format')}, "
        f"{created.get('examples')} examples"
    )
    typer.echo(created["id"])


@files_cli.command("validate")
def files_validate(
    path: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)],
    model: Annotated[str, typer.Option(help="Target model.")] = "gpt-4o-mini-2024-07-18",
    method: Annotated[str, typer.Option(help="supervised or dpo.")] = "supervised",
    n_epochs: Annotated[int | None, typer.Option("--epochs", min=1, max=50)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Check a local dataset before anything else: errors by line, tokens, cost. No server
    needed. Exit status 1 when the file is invalid."""
    from app.kit.errors import APIError
    from app.validation.engine import validate_file
    from app.validation.service import resolve_target

    settings = _settings()
    _quiet_logging(settings)
    try:
        target = resolve_target(settings, model, method, n_epochs)
    except APIError as exc:
        err.print(f"[red]{exc.message}[/red]")
        raise typer.Exit(2) from None
    report = validate_file(path, target, max_line_bytes=settings.validation.max_line_bytes)
    if as_json:
        typer.echo(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        _print_report(path, report)
    if report["verdict"] == "invalid":
        raise typer.Exit(1)


def _print_report(path: Path, report: dict[str, object]) -> None:
    console = Console()
    colour = {"valid": "green", "valid_with_warnings": "yellow", "invalid": "red"}
    verdict = str(report["verdict"])
    console.print(
        f"[bold]{path.name}[/bold]: [{colour.get(verdict, 'white')}]{verdict}[/] — "
        f"{report['examples']} examples, format {report['format']}, model {report['model']} "
        f"({report['method']})"
    )
    for title, key in (("Errors", "errors"), ("Warnings", "warnings")):
        items = report.get(key) or []
        if not isinstance(items, list) or not items:
            continue
        table = Table(title=title, title_justify="left")
        table.add_column("code", no_wrap=True)
        table.add_column("count", justify="right")
        table.add_column("first occurrences (line: field — why)")
        for item in items:
            places = "\n".join(
                f"{o.get('line')}: {o.get('path') or '-'} — {o.get('message')}"
                for o in item.get("occurrences", [])[:3]
            )
            table.add_row(item["code"], str(item["count"]), places or item.get("message", ""))
        console.print(table)
    tokens = report.get("tokens") or {}
    cost = report.get("cost") or {}
    if isinstance(tokens, dict) and isinstance(cost, dict):
        usd = cost.get("usd")
        console.print(
            f"Tokens: {tokens.get('total')} total, {tokens.get('trained')} trained "
            f"({tokens.get('tokenizer')}). Epochs: {cost.get('n_epochs')} "
            f"({cost.get('n_epochs_source')}). Billable: {cost.get('billable_tokens')} tokens"
            + (
                f", about ${usd:.2f} (prices of {cost.get('price_date')})."
                if usd is not None
                else "."
            )
        )


@files_cli.command("list")
def files_list(
    api_key: ApiKeyOption,
    purpose: Annotated[str | None, typer.Option(help="Only files with this purpose.")] = None,
    base_url: BaseUrlOption = "http://127.0.0.1:8000",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List the project's files."""
    from datetime import UTC, datetime

    from app.files.client import TunegateClient, TunegateError

    client = TunegateClient(base_url, api_key)
    try:
        files = client.list_files(purpose)
    except TunegateError as exc:
        err.print(f"[red]{exc.message}[/red]")
        raise typer.Exit(1) from None
    except OSError as exc:
        err.print(f"[red]Cannot reach tunegate at {base_url}: {exc}[/red]")
        raise typer.Exit(1) from None
    finally:
        client.close()
    if as_json:
        typer.echo(json.dumps(files, indent=2, ensure_ascii=False))
        return
    table = Table("filename", "purpose", "bytes", "format", "examples", "created")
    table.columns.insert(0, Column("id", no_wrap=True))
    for item in files:
        created = datetime.fromtimestamp(item["created_at"], UTC)
        table.add_row(
            item["id"],
            item["filename"],
            item["purpose"],
            str(item["bytes"]),
            str(item.get("format")),
            str(item.get("examples") if item.get("examples") is not None else "-"),
            f"{created:%Y-%m-%d %H:%M}",
        )
    Console().print(table)


def main() -> None:
    cli(prog_name="tunegate")


if __name__ == "__main__":  # pragma: no cover
    main()
