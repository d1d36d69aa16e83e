from __future__ import annotations

from app.models import Scope


async def test_healthz_and_readyz(client) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "database": "ok", "migrations": "at_head"}


async def test_metrics_count_requests_by_route_template(client_for, factories) -> None:
    creds = await factories.key(scope=Scope.admin)
    api = client_for(creds.key)
    await api.get("/v1/projects/proj_abc")
    await api.get("/v1/nope")
    text = (await api.get("/metrics")).text
    labels = 'method="GET",route="/v1/projects/{project_id}",status="404"'
    assert f"tunegate_http_requests_total{{{labels}}} 1.0" in text
    assert 'route="<unmatched>"' in text
    assert "proj_abc" not in text  # ids never become label values
    assert "tunegate_http_request_duration_seconds_bucket" in text
