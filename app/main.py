"""The FastAPI application: `create_app()` wires settings, database, routes and plumbing."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.routing import APIRoute
from prometheus_client import CollectorRegistry, Gauge

from app import __version__
from app.auth import service as auth_service
from app.auth.cache import KeyCache
from app.auth.dependencies import RateLimiter
from app.auth.endpoints import router as api_keys_router
from app.config import Settings, get_settings
from app.db.embedded import stop_embedded_postgres
from app.db.engine import Database, create_engine, resolve_database_url
from app.db.migrate import is_at_head
from app.evals.endpoints import router as evals_router
from app.files.endpoints import files_router, uploads_router
from app.files.storage import BlobStorage, make_storage
from app.health.endpoints import router as health_router
from app.inference.ab import router as ab_router
from app.inference.endpoints import router as inference_router
from app.inference.proxy import HotPaths
from app.inference.usage import UsageRecorder
from app.jobs.endpoints import router as jobs_router
from app.jobs.provider_webhooks import router as provider_webhooks_router
from app.kit.http import RequestContextMiddleware, body_limit_by_path, install_error_handlers
from app.kit.logging import get_logger
from app.kit.metrics import HTTPMetrics
from app.projects.endpoints import router as projects_router
from app.providers.base import Provider
from app.providers.registry import build_providers, close_providers
from app.registry.endpoints import router as models_router
from app.validation.endpoints import router as validation_router
from app.webhooks.endpoints import deliveries_router as webhook_deliveries_router
from app.webhooks.endpoints import document_webhooks
from app.webhooks.endpoints import router as webhook_endpoints_router
from app.workers import roles as worker_roles  # noqa: F401 - registers every role
from app.workers.runner import ROLES, WorkerContext, WorkerRunner

log = get_logger("tunegate.app")


def operation_id(route: APIRoute) -> str:
    """Stable operation ids: the endpoint function's name (unique across the app)."""
    return route.name


async def _open_database(settings: Settings) -> Database:
    url = await asyncio.to_thread(resolve_database_url, settings)
    return Database(create_engine(url, settings))


async def _bootstrap(app: FastAPI) -> None:
    database: Database = app.state.database
    settings: Settings = app.state.settings
    async with database.engine.connect() as conn:
        if not await is_at_head(conn):
            log.warning("database schema is not at head; run `tunegate migrate`")
            return
    async with database.sessionmaker() as session, session.begin():
        created = await auth_service.ensure_bootstrap_admin(session, settings)
    if created is not None:
        log.info("bootstrap admin key registered", project="default", prefix=created.prefix)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    owns_database = getattr(app.state, "database", None) is None
    if owns_database:
        app.state.database = await _open_database(settings)
    owns_providers = getattr(app.state, "providers", None) is None
    if owns_providers:
        app.state.providers = build_providers(settings)
    owns_storage = getattr(app.state, "storage", None) is None
    if owns_storage:
        app.state.storage = make_storage(settings)
    runner: WorkerRunner | None = None
    try:
        await _bootstrap(app)
        await app.state.key_cache.start(app.state.database.plain_dsn())
        if app.state.run_workers:
            context = WorkerContext(settings, app.state.database, app.state.metrics_registry)
            runner = WorkerRunner(context, list(ROLES))
            runner.start()
        yield
    finally:
        if runner is not None:
            await runner.stop(settings.server.graceful_shutdown.total_seconds())
        await app.state.usage.close()
        await app.state.key_cache.close()
        if owns_storage:
            await app.state.storage.close()
        if owns_providers:
            await close_providers(app.state.providers)
        if owns_database:
            await app.state.database.dispose()
            if settings.database_url is None:
                stop_embedded_postgres()


def create_app(
    settings: Settings | None = None,
    *,
    database: Database | None = None,
    storage: BlobStorage | None = None,
    providers: dict[str, Provider] | None = None,
    run_workers: bool = False,
) -> FastAPI:
    """Build the app. `database` and `storage` are opened by the lifespan when not given."""
    settings = settings or get_settings()
    app = FastAPI(
        title="tunegate",
        version=__version__,
        summary="Self-hosted, OpenAI-compatible control plane for fine-tuning LLMs.",
        lifespan=lifespan,
        generate_unique_id_function=operation_id,
        # A trailing slash is a 404 in the envelope, not a redirect built from the Host header.
        redirect_slashes=False,
    )
    app.state.settings = settings
    app.state.database = database
    app.state.storage = storage
    app.state.providers = providers
    app.state.run_workers = run_workers
    app.state.metrics_registry = CollectorRegistry()
    app.state.job_gauge = Gauge(
        "tunegate_jobs",
        "Fine-tuning jobs by status (all projects), read at scrape time.",
        ["status"],
        registry=app.state.metrics_registry,
    )
    app.state.key_cache = KeyCache(
        settings.auth.key_cache_ttl.total_seconds(), app.state.metrics_registry
    )
    app.state.rate_limiter = RateLimiter(settings.auth.rate_limit_per_minute)
    app.state.inference_limiter = RateLimiter(settings.inference.rate_limit_per_minute)
    app.state.usage = UsageRecorder(
        lambda: app.state.database.sessionmaker,
        settings.inference.usage_flush_interval.total_seconds(),
    )

    install_error_handlers(app)
    # Added first, so it runs inside RequestContextMiddleware (added last, outermost).
    app.add_middleware(HotPaths)
    app.add_middleware(
        RequestContextMiddleware,
        body_limit=body_limit_by_path(settings.max_request_bytes, _upload_body_limits(settings)),
        metrics=HTTPMetrics(app.state.metrics_registry),
    )
    app.include_router(health_router)
    app.include_router(projects_router)
    app.include_router(api_keys_router)
    app.include_router(files_router)
    app.include_router(uploads_router)
    app.include_router(validation_router)
    app.include_router(jobs_router)
    app.include_router(provider_webhooks_router)
    app.include_router(models_router)
    app.include_router(inference_router)
    # Before any other /v1/evals/... route: /v1/evals/ab/{alias} is not an eval's id.
    app.include_router(ab_router)
    app.include_router(evals_router)
    app.include_router(webhook_endpoints_router)
    app.include_router(webhook_deliveries_router)
    document_webhooks(app)
    return app


# Multipart framing around the file itself: headers, boundaries, the small fields.
_MULTIPART_OVERHEAD = 1024 * 1024


def _upload_body_limits(settings: Settings) -> list[tuple[re.Pattern[str], int]]:
    files = settings.files
    completions = settings.inference.max_request_bytes
    return [
        (re.compile(r"^/v1/(chat/)?completions/?$"), completions),
        (re.compile(r"^/v1/files/?$"), files.max_file_bytes + _MULTIPART_OVERHEAD),
        (re.compile(r"^/v1/uploads/[^/]+/parts/?$"), files.max_part_bytes + _MULTIPART_OVERHEAD),
    ]
