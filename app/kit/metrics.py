"""Prometheus metrics, one registry per app so several apps in one process do not collide."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram


class HTTPMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "tunegate_http_requests",
            "HTTP requests by method, route template and status code.",
            ["method", "route", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "tunegate_http_request_duration_seconds",
            "Time from request start to the end of the response, by route template.",
            ["method", "route"],
            registry=registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )


class SyncMetrics:
    """The job syncer: syncs and provider calls by outcome, and how late changes arrive."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.syncs = Counter(
            "tunegate_job_syncs",
            "Job syncs by provider and outcome (ok, changed, error).",
            ["provider", "outcome"],
            registry=registry,
        )
        self.provider_calls = Counter(
            "tunegate_provider_calls",
            "Calls to a provider by operation and outcome (ok or the error class).",
            ["provider", "operation", "outcome"],
            registry=registry,
        )
        self.lag = Histogram(
            "tunegate_job_sync_lag_seconds",
            "Time from a status change at the provider to its arrival in tunegate.",
            ["provider"],
            registry=registry,
            buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800),
        )
        self.duration = Histogram(
            "tunegate_job_sync_duration_seconds",
            "Time one job sync takes, provider calls and database writes together.",
            ["provider"],
            registry=registry,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.database = Histogram(
            "tunegate_job_sync_database_seconds",
            "Database time of one job sync (its share of the claim, plus its write).",
            ["provider"],
            registry=registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
        )


class WebhookMetrics:
    """The webhook dispatcher: attempts by outcome, how long they take, and how late they go."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.attempts = Counter(
            "tunegate_webhook_attempts",
            "Webhook delivery attempts by outcome (succeeded, failed, refused, timeout, error).",
            ["outcome"],
            registry=registry,
        )
        self.duration = Histogram(
            "tunegate_webhook_attempt_duration_seconds",
            "Time one delivery attempt takes, from connecting to the receiver's answer.",
            registry=registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 30),
        )
        self.lag = Histogram(
            "tunegate_webhook_first_attempt_lag_seconds",
            "Time from an event to the first attempt to deliver it.",
            registry=registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
