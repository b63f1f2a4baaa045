"""Wire the Falcon app: routes, error handling, static files. Nothing else happens here."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import falcon

from http_frontend import request_ids, resources
from http_frontend.auth import ApiKey, ApiKeyAuth, default_name
from http_frontend.broker_client import BrokerClient
from http_frontend.cluster_view import ClusterView
from http_frontend.errors import install_error_handlers
from http_frontend.image_fetch import ImageFetcher
from http_frontend.jobs_api import JobsAPI
from http_frontend.metrics import Metrics
from http_frontend.request_ids import RequestIds
from http_frontend.service import ImageService, ServiceConfig

# The web UI: http_frontend/static when installed from a wheel (setup.cfg puts it there),
# static/ beside the packages in a checkout.
STATIC_DIR = Path(__file__).resolve().parent / "static"
if not STATIC_DIR.is_dir():
    STATIC_DIR = STATIC_DIR.parent.parent / "static"


# The routes whose bodies are uploads (--max-edit-body-mb), not JSON (--max-body).
UPLOAD_PATHS = ("/v1/images/edits", "/v1/jobs/edits")


@dataclass(frozen=True, kw_only=True)
class FrontendConfig:
    service: ServiceConfig = field(default_factory=ServiceConfig)
    max_body: int = 1 << 20
    max_edit_body: int = 64 << 20  # an edit's upload: its images and mask, multipart or JSON
    # Fetch remote image URLs named in JSON edits (None: refuse them; see edit_requests).
    image_fetcher: ImageFetcher | None = None
    static_dir: Path = STATIC_DIR
    # None: the API is open (bind to loopback, or set keys); a plain string is a key with
    # its default name.
    api_keys: tuple[ApiKey | str, ...] = ()
    cors_origins: tuple[str, ...] = ()  # none: no cross-origin browser calls
    image_ttl: float | None = None  # seconds images are kept: how long clients may cache them
    metrics_token: str | None = None  # None: /metrics is open (bind to loopback, or set one)

    def __repr__(self) -> str:  # never print the keys
        return (f"FrontendConfig(service={self.service!r}, max_body={self.max_body}, "
                f"api_keys=<{len(self.api_keys)}>, cors_origins={self.cors_origins!r}, "
                f"metrics_token={'<set>' if self.metrics_token else None})")


def create_app(config: FrontendConfig, broker: BrokerClient, *, service: ImageService | None = None,
               jobs: JobsAPI | None = None) -> falcon.App[falcon.Request, falcon.Response]:
    service = service or ImageService(broker, config.service)
    # With API keys, a plain key never sees other identities' names (/v1/cluster): an open
    # /metrics must not show them either; a metrics token makes it the operator's.
    metrics = Metrics(broker, open_streams=lambda: service.open_streams,
                      name_identities=not config.api_keys or config.metrics_token is not None)
    service.watch_jobs(metrics.job_submitted)
    # Metrics first: it counts the requests the others refuse. Request ids next: every
    # answer carries one, those refused by the middleware after it included.
    middleware: list[Any] = [metrics.middleware(), RequestIds(), resources.MethodCheck()]
    if config.cors_origins:
        middleware.append(falcon.CORSMiddleware(
            allow_origins=list(config.cors_origins),
            expose_headers=["Retry-After", "x-should-retry", request_ids.HEADER]))
    if config.api_keys:
        middleware.append(ApiKeyAuth([k if isinstance(k, ApiKey) else ApiKey(k, default_name(k))
                                      for k in config.api_keys]))
    app = falcon.App(middleware=middleware)
    app.req_options.strip_url_path_trailing_slash = True
    install_error_handlers(app)
    view = ClusterView(broker, retry_after=config.service.retry_after)
    jobs = jobs or JobsAPI(service)
    app.add_route("/v1/images/generations",
                  resources.ImageGenerations(service, max_body=config.max_body))
    app.add_route("/v1/images/edits",
                  resources.ImageEdits(service, max_body=config.max_edit_body,
                                       fetcher=config.image_fetcher))
    app.add_route("/v1/jobs", resources.Jobs(jobs, max_body=config.max_body))
    app.add_route("/v1/jobs/edits", resources.EditJobs(jobs, max_body=config.max_edit_body,
                                                       fetcher=config.image_fetcher))
    app.add_route("/v1/jobs/{job_id}", resources.Job(jobs))
    app.add_route("/v1/jobs/{job_id}/events", resources.JobEvents(jobs))
    app.add_route("/v1/jobs/{job_id}/cancel", resources.JobCancel(jobs))
    app.add_route("/v1/images/files/{name}",
                  resources.ImageFiles(service.history, max_age=config.image_ttl))
    app.add_route("/v1/models", resources.Models(view))
    app.add_route("/v1/models/{model_id:path}", resources.Model(view, service))
    app.add_route("/v1/loras", resources.Loras(view))
    app.add_route("/v1/cluster", resources.Cluster(view))
    app.add_route("/healthz", resources.Health())
    app.add_route("/metrics", resources.MetricsPage(metrics, token=config.metrics_token))
    app.add_route("/readyz", resources.Ready(view, service))
    app.add_route("/", resources.Index(config.static_dir))
    app.add_route(resources.StaticFiles.PREFIX + "/{path:path}",
                  resources.StaticFiles(config.static_dir))
    return app
