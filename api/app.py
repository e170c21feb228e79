"""The FastAPI application: `create_app()` is the factory `obdconv api` runs with uvicorn.

    uvicorn --factory api.app:create_app --host 127.0.0.1 --port 8080     # what `obdconv api` does

Routes: /v1/conversions (api/conversions.py), /v1/events/* (api/events.py), /healthz, /readyz
(api/health.py), /metrics, and the OpenAPI document at /openapi.json (browsable at /docs).
"""

from __future__ import annotations

from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api import conversions, events, health
from api.metrics import MetricsMiddleware
from api.problems import install_handlers
from api.service import Service, build_service
from config.settings import Settings, load_settings
from tasks import notify
from workers.metrics import register_fleet_collectors

DESCRIPTION = """\
Enqueue conversions of container images to overlaybd / overlaybd-turboOCI on an obdconv fleet,
follow them, cancel them; turn registry pushes into conversions. Errors are RFC 9457 problem
details whose `error_class` is one of obdconv's error classes (the CLI's exit codes)."""


def create_app(settings: Settings | None = None) -> FastAPI:
    service = build_service(settings or load_settings())
    app = FastAPI(title="obdconv API", version="1", description=DESCRIPTION, openapi_url="/openapi.json",
                  docs_url="/docs", redoc_url=None)
    app.state.service = service
    install_handlers(app)
    app.include_router(conversions.router)
    app.include_router(events.router)
    app.include_router(health.router)

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics", response_class=Response)
    def metrics(request: Request) -> Response:
        current: Service = request.app.state.service
        return Response(generate_latest(current.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # The fleet's scrape-time gauges (queue depth, live workers and claims) join the API's own.
    register_fleet_collectors(service.metrics.registry, service.settings)
    # A cancel written here is announced like any final state: callback, pub/sub event, metrics.
    notify.install()
    app.add_middleware(MetricsMiddleware, metrics=service.metrics)
    return app
