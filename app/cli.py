"""The `tunegate` command: serve, migrate, worker, keys, files, jobs."""

from __future__ import annotations

import asyncio
import enum
import json
from collections.abc import Awaitable, Callable, Generator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer
from rich.console import Console
from rich.table import Column, Table
from sqlalchemy.ext.asyncio import AsyncSession

from app import __version__
from app.config import LogFormat, LogSettings, Settings
from app.evals.cli import evals_cli
from app.kit.logging import configure_logging
from app.models import Scope
from app.providers.emulator.cli import emulator

if TYPE_CHECKING:
    from app.files.client import TunegateClient, TunegateError
    from app.jobs.client import Event, Job, JobsClient, Update
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
jobs_cli = typer.Typer(
    help="Create, follow, list and cancel fine-tuning jobs on a running tunegate.",
    no_args_is_help=True,
)
cli.add_typer(jobs_cli, name="jobs")
cli.add_typer(evals_cli, name="evals")


def console(*, stderr: bool = False, width: int | None = None, highlight: bool = True) -> Console:
    """A console that prints text as written: file names, roles, messages and model names come
    from users, and rich would read "[/]" in them as markup (and crash) or ":x:" as an emoji
    code. Colour is given explicitly (`say`, `Text(…, style=…)`)."""
    return Console(stderr=stderr, width=width, highlight=highlight, markup=False, emoji=False)


err = console(stderr=True)
out = console()


def _settings() -> Settings:
    try:
        return Settings()
    except Exception as exc:  # pydantic's message says which variable is wrong
        say(f"Invalid configuration: {exc}", "red")
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
    say("database schema is at the latest migration", "green")


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
    metrics_port: Annotated[
        int | None,
        typer.Option("--metrics-port", help="Serve Prometheus metrics on this port."),
    ] = None,
) -> None:
    """Run background worker roles (no HTTP API)."""
    from prometheus_client import CollectorRegistry, start_http_server

    from app.db.engine import Database, create_engine
    from app.workers import roles as _roles  # noqa: F401 - registers every role
    from app.workers.runner import ROLES, WorkerContext, WorkerRunner

    settings = _settings()
    configure_logging(settings.log)
    roles = role or sorted(ROLES)
    url = _database_url(settings)

    async def run() -> None:
        import signal

        database = Database(create_engine(url, settings))
        try:
            registry = CollectorRegistry()
            runner = WorkerRunner(WorkerContext(settings, database, registry), roles)
        except ValueError as exc:
            say(str(exc), "red")
            raise typer.Exit(2) from None
        if metrics_port is not None:
            start_http_server(metrics_port, registry=registry)
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
        say(exc.message, "red")
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
        say(exc.message, "red")
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
        say(exc.message, "red")
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
    out.print(table)


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
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TransferSpeedColumn,
    )

    from app.files.client import TunegateClient

    client = TunegateClient(base_url, api_key)
    columns = (
        TextColumn("{task.description}", markup=False, style="progress.description"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
    )
    with closing(client), talking_to(base_url), Progress(*columns, console=err) as progress:
        task = progress.add_task(path.name, total=path.stat().st_size)
        created = client.upload(path, purpose, lambda n: progress.advance(task, n))
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
        say(exc.message, "red")
        raise typer.Exit(2) from None
    report = validate_file(path, target, max_line_bytes=settings.validation.max_line_bytes)
    if as_json:
        typer.echo(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        _print_report(path, report)
    if report["verdict"] == "invalid":
        raise typer.Exit(1)


def _print_report(path: Path, report: dict[str, object]) -> None:
    from rich.text import Text

    colour = {"valid": "green", "valid_with_warnings": "yellow", "invalid": "red"}
    verdict = str(report["verdict"])
    out.print(
        Text.assemble(
            (path.name, "bold"),
            ": ",
            (verdict, colour.get(verdict, "")),
            f" — {report['examples']} examples, format {report['format']}, "
            f"model {report['model']} ({report['method']})",
        )
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
        out.print(table)
    tokens = report.get("tokens") or {}
    cost = report.get("cost") or {}
    if isinstance(tokens, dict) and isinstance(cost, dict):
        usd = cost.get("usd")
        out.print(
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

    from app.files.client import TunegateClient

    client = TunegateClient(base_url, api_key)
    with closing(client), talking_to(base_url):
        files = client.list_files(purpose)
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
    out.print(table)


# --- tunegate jobs ...: fine-tuning jobs on a running tunegate, over its HTTP API ---------------


class TrainingMethod(enum.StrEnum):
    supervised = "supervised"
    dpo = "dpo"


def say(message: str, style: str = "") -> None:
    """A line on stderr, unwrapped (rich wraps at 80 columns when stderr is not a terminal)."""
    from rich.text import Text

    err.print(Text(message, style=style), soft_wrap=True)


def fail(message: str, code: int = 1) -> typer.Exit:
    say(message, "red")
    return typer.Exit(code)


def _api_error(exc: TunegateError) -> str:
    code = getattr(exc, "code", None)
    return f"Error ({exc.status}{f' {code}' if code else ''}): {exc.message}"


@contextmanager
def talking_to(base_url: str) -> Generator[None, None, None]:
    """An error answer or an unreachable server becomes a message on stderr and exit status 1."""
    import httpx2

    from app.files.client import TunegateError

    try:
        yield
    except TunegateError as exc:
        raise fail(_api_error(exc)) from None
    except BrokenPipeError:
        # The reader went away (`… | head`): stop quietly, as tools killed by SIGPIPE do.
        import os
        import sys

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(141) from None
    except (OSError, httpx2.TransportError) as exc:
        raise fail(f"Cannot reach tunegate at {base_url}: {exc}") from None


def _local_time(unix: int | None, seconds: bool = False) -> str:
    from datetime import datetime

    if unix is None:
        return "-"
    return datetime.fromtimestamp(unix).strftime("%Y-%m-%d %H:%M" + (":%S" if seconds else ""))


def file_or_path(value: str, option: str) -> str | Path:
    """An existing local path is to be uploaded; otherwise it must be a file id."""
    path = Path(value).expanduser()
    if path.is_file():
        return path
    if value.startswith("file-"):
        return value
    raise fail(f"{option}: {value} is neither a local file nor a file id (file-…).", 2)


def upload_file(files: TunegateClient, path: Path, purpose: str = "fine-tune") -> str:
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TransferSpeedColumn,
    )

    columns = (
        TextColumn("{task.description}", markup=False, style="progress.description"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
    )
    # A bar only on a terminal: elsewhere rich would leave an empty line behind.
    with Progress(*columns, console=err, transient=True, disable=not err.is_terminal) as progress:
        task = progress.add_task(f"uploading {path.name}", total=path.stat().st_size)
        created = files.upload(path, purpose, lambda n: progress.advance(task, n))
    examples = created.get("examples")
    say(
        f"Uploaded {path.name} as {created['id']}"
        + (f" ({examples} examples)" if examples is not None else "")
    )
    return str(created["id"])


def _job_body(
    model: str,
    suffix: str | None,
    seed: int | None,
    method: TrainingMethod | None,
    hyperparameters: dict[str, object],
    provider: str | None,
    metadata: list[str] | None,
) -> dict[str, object]:
    """The create body without its files, checked here with the API's own schema so that a
    mistake is reported before anything is uploaded."""
    from pydantic import ValidationError

    from app.jobs.client import method_object
    from app.jobs.schemas import JobCreate

    pairs: dict[str, str] = {}
    for item in metadata or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise fail(f"--metadata wants KEY=VALUE, got '{item}'.", 2)
        pairs[key] = value
    body: dict[str, object] = {"model": model}
    chosen = {
        "suffix": suffix,
        "seed": seed,
        "method": method_object(method.value if method else None, hyperparameters),
        "provider": provider,
        "metadata": pairs or None,
    }
    body |= {name: value for name, value in chosen.items() if value is not None}
    try:
        JobCreate.model_validate(body | {"training_file": "file-unchecked"})
    except ValidationError as exc:
        # One message per option: a union (an int or "auto") reports each branch; the first
        # branch is the one a number given on the command line failed.
        problems: dict[str, str] = {}
        for error in exc.errors():
            fields = [str(p) for p in error["loc"] if str(p).isidentifier()]
            option = f"--{fields[-1].replace('_', '-')}" if fields else "job"
            problems.setdefault(option, error["msg"])
        raise fail("; ".join(f"{o}: {m}" for o, m in problems.items()), 2) from None
    return body


@jobs_cli.command("create")
def jobs_create(
    file: Annotated[
        str,
        typer.Option(
            "--file", help="Training data: a local JSONL path (uploaded first) or a file id."
        ),
    ],
    model: Annotated[str, typer.Option(help="Base model, e.g. gpt-4o-mini-2024-07-18.")],
    api_key: ApiKeyOption,
    validation_file: Annotated[
        str | None, typer.Option(help="Held-out data: a local path or a file id.")
    ] = None,
    suffix: Annotated[str | None, typer.Option(help="Part of the fine-tuned model's name.")] = None,
    seed: Annotated[int | None, typer.Option(help="For a reproducible run.")] = None,
    n_epochs: Annotated[int | None, typer.Option(help="Default: chosen by the provider.")] = None,
    batch_size: Annotated[int | None, typer.Option()] = None,
    learning_rate_multiplier: Annotated[float | None, typer.Option()] = None,
    method: Annotated[
        TrainingMethod | None, typer.Option(help="Default: supervised.", case_sensitive=False)
    ] = None,
    beta: Annotated[float | None, typer.Option(help="DPO only.")] = None,
    provider: Annotated[
        str | None, typer.Option(help="A configured provider (openai); default: the model's.")
    ] = None,
    metadata: Annotated[
        list[str] | None, typer.Option("--metadata", help="KEY=VALUE; repeat for several.")
    ] = None,
    idempotency_key: Annotated[
        str | None,
        typer.Option(
            help="The same create again within 24 h answers the same job (with file ids: a "
            "local file is uploaded anew each time)."
        ),
    ] = None,
    follow: Annotated[
        bool, typer.Option("--follow", help="Then follow it, as `tunegate jobs follow`.")
    ] = False,
    interval: Annotated[
        float, typer.Option(min=0.1, help="Seconds between polls with --follow.")
    ] = 2.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the job object as JSON.")] = False,
    base_url: BaseUrlOption = "http://127.0.0.1:8000",
) -> None:
    """Create a fine-tuning job (a local file is uploaded first) and print its id.

    --file and --validation-file take a local path or a file id (file-…). The job's id goes to
    stdout (the job object with --json); --follow then follows it as `tunegate jobs follow`."""
    from app.files.client import TunegateClient
    from app.jobs.client import JobsClient, JobsError

    if as_json and follow:
        raise fail("--json and --follow cannot be used together.", 2)
    if beta is not None and method is not TrainingMethod.dpo:
        raise fail("--beta applies to --method dpo only.", 2)
    training = file_or_path(file, "--file")
    held_out = (
        None if validation_file is None else file_or_path(validation_file, "--validation-file")
    )
    hyperparameters: dict[str, object] = {
        name: value
        for name, value in {
            "n_epochs": n_epochs,
            "batch_size": batch_size,
            "learning_rate_multiplier": learning_rate_multiplier,
            "beta": beta,
        }.items()
        if value is not None
    }
    body = _job_body(model, suffix, seed, method, hyperparameters, provider, metadata)

    said: set[str] = set()

    def waiting(exc: JobsError) -> None:
        if exc.message not in said:  # once per validation, not every few seconds
            said.add(exc.message)
            say(f"{exc.message} Waiting…", "dim")

    with (
        talking_to(base_url),
        closing(TunegateClient(base_url, api_key)) as files,
        JobsClient(base_url, api_key) as jobs,
    ):
        if isinstance(training, Path):
            training = upload_file(files, training)
        if isinstance(held_out, Path):
            held_out = upload_file(files, held_out)
        body["training_file"] = training
        if held_out is not None:
            body["validation_file"] = held_out
        try:
            job = jobs.create(body, idempotency_key=idempotency_key, on_validation_pending=waiting)
        except JobsError as exc:
            local = {"invalid_training_file": file, "invalid_validation_file": validation_file}
            path = local.get(exc.code or "")
            if path is None or not Path(path).is_file():
                raise
            say(_api_error(exc), "red")
            how = f" --method {method.value}" if method else ""
            say(f"Check it locally: tunegate files validate {path} --model {model}{how}")
            raise typer.Exit(1) from None
        if as_json:
            typer.echo(json.dumps(job, indent=2, ensure_ascii=False))
            return
        cost = job.get("estimated_cost")
        say(
            f"Created {job['id']}: {job['status']}, model {job['model']}, provider "
            f"{job.get('provider')}" + (f", estimated cost ${cost:.2f}" if cost is not None else "")
        )
        typer.echo(job["id"])
        if not follow:
            return
        code = _follow(jobs, job["id"], interval)
    raise typer.Exit(code)


@jobs_cli.command("follow")
def jobs_follow(
    job_id: Annotated[str, typer.Argument(help="The job's id (ftjob-…).")],
    api_key: ApiKeyOption,
    interval: Annotated[float, typer.Option(min=0.1, help="Seconds between polls.")] = 2.0,
    base_url: BaseUrlOption = "http://127.0.0.1:8000",
    events_page_size: Annotated[int, typer.Option(min=1, max=100, hidden=True)] = 100,
) -> None:
    """Print a job's events and progress until it ends.

    Events are printed once each, oldest first, in local time, with a progress bar on a
    terminal. Exit status 0 when the job succeeded, 1 when it failed or was cancelled, 130 when
    Ctrl-C stopped the following (the job goes on)."""
    from app.jobs.client import JobsClient

    with (
        talking_to(base_url),
        JobsClient(base_url, api_key, events_page_size=events_page_size) as jobs,
    ):
        code = _follow(jobs, job_id, interval)
    raise typer.Exit(code)


def _event_line(event: Event, with_percent: bool = False) -> str:
    from app.jobs.client import steps_of_event

    line = f"[{_local_time(event['created_at'], seconds=True)}] {event['message']}"
    steps = steps_of_event(event)
    if with_percent and steps is not None:
        line += f" ({100 * steps[0] // steps[1]}%)"
    return line


def _outage(exc: Exception) -> None:
    say(f"tunegate does not answer ({exc}); still trying…", "yellow")


def _follow(jobs: JobsClient, job_id: str, interval: float) -> int:
    """Follow until the job ends; the exit status for it."""
    screen = console(highlight=False)
    last: Update | None = None
    try:
        if screen.is_terminal and not screen.is_dumb_terminal:
            last = _follow_with_bar(screen, jobs, job_id, interval)
        else:
            # Not a terminal: one plain line per event, flushed, never a redrawn bar.
            for last in jobs.watch(job_id, interval, on_outage=_outage):
                for event in last.events:
                    typer.echo(_event_line(event, with_percent=True))
    except KeyboardInterrupt:
        say(
            f"Stopped following {job_id}; the job goes on (cancel it with "
            f"`tunegate jobs cancel {job_id}`)."
        )
        return 130
    assert last is not None  # watch yields until the job has ended
    return _report_end(last)


def _follow_with_bar(screen: Console, jobs: JobsClient, job_id: str, interval: float) -> Update:
    from rich.progress import (
        BarColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )
    from rich.text import Text

    styles = {"warn": "yellow", "error": "red"}
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[steps]}"),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
    )
    last: Update | None = None
    with Progress(*columns, console=screen, transient=True) as progress:
        task = progress.add_task("", total=None, steps="", detail="")
        for last in jobs.watch(job_id, interval, on_outage=_outage):
            for event in last.events:
                progress.console.print(
                    Text(_event_line(event), style=styles.get(event["level"], ""))
                )
            steps = last.steps
            loss = last.metrics.get("train_loss")
            progress.update(
                task,
                description=last.job["status"],
                total=steps[1] if steps else None,
                completed=steps[0] if steps else 0,
                steps=f"{steps[0]}/{steps[1]} steps" if steps else "",
                detail=f"loss {loss:.4f}" if isinstance(loss, int | float) else "",
            )
    assert last is not None
    return last


def _report_end(last: Update) -> int:
    job: Job = last.job
    steps = f" after {last.steps[0]}/{last.steps[1]} steps" if last.steps else ""
    if job["status"] == "succeeded":
        typer.echo(f"Job {job['id']} succeeded{steps}: fine-tuned model {job['fine_tuned_model']}")
        return 0
    if job["status"] == "failed":
        error = job.get("error") or {}
        code = f" ({error['code']})" if error.get("code") else ""
        typer.echo(
            f"Job {job['id']} failed{steps}: {error.get('message') or 'no reason given'}{code}"
        )
        return 1
    typer.echo(f"Job {job['id']} was {job['status']}{steps}.")
    return 1


@jobs_cli.command("list")
def jobs_list(
    api_key: ApiKeyOption,
    limit: Annotated[int, typer.Option(min=1, help="How many of the newest jobs.")] = 20,
    all_jobs: Annotated[
        bool, typer.Option("--all", help="Every job, not only the newest.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    base_url: BaseUrlOption = "http://127.0.0.1:8000",
) -> None:
    """List the project's fine-tuning jobs, newest first."""
    from app.jobs.client import JobsClient

    with talking_to(base_url), JobsClient(base_url, api_key) as jobs:
        found, more = jobs.list_jobs(None if all_jobs else limit)
    if as_json:
        typer.echo(json.dumps(found, indent=2, ensure_ascii=False))
    else:
        _print_jobs(found)
    if more:
        say(f"More jobs: raise --limit (now {limit}) or use --all.")


def _print_jobs(found: list[Job]) -> None:
    headers = ("id", "status", "model", "fine_tuned_model", "created")
    rows = [
        (
            job["id"],
            job["status"],
            job["model"],
            job.get("fine_tuned_model") or "-",
            _local_time(job["created_at"]),
        )
        for job in found
    ]
    if out.is_terminal:
        table = Table(*(Column(name, no_wrap=name == "id") for name in headers))
        for row in rows:
            table.add_row(*row)
        out.print(table)
        return
    # Piped: aligned plain columns that never wrap, for grep and awk.
    widths = [max(len(v) for v in column) for column in zip(headers, *rows, strict=True)]
    for row in (headers, *rows):
        typer.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


@jobs_cli.command("cancel")
def jobs_cancel(
    job_id: Annotated[str, typer.Argument(help="The job's id (ftjob-…).")],
    api_key: ApiKeyOption,
    base_url: BaseUrlOption = "http://127.0.0.1:8000",
) -> None:
    """Cancel an unfinished job (at its provider too) and print its new status."""
    from app.jobs.client import JobsClient

    with talking_to(base_url), JobsClient(base_url, api_key) as jobs:
        job = jobs.cancel(job_id)
    typer.echo(f"{job['id']}: {job['status']}")


def main() -> None:
    cli(prog_name="tunegate")


if __name__ == "__main__":  # pragma: no cover
    main()
