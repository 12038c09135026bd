"""GET /metrics: the deployment's state for Prometheus (names and help: models/metrics.py).

At every scrape one GROUP BY each reads jobs by state and priority (and the oldest queued job's
age), webhook deliveries by state and their tries by result from the database; LLEN reads the
interactive and bulk queues' depth from Redis. A source that does not answer is left out and
`sdqueue_metrics_source_up` says so. The API's own requests are counted too (route templates,
never raw paths). No key is needed, as for /healthz.

`sdqueue api --workers N` runs N processes: their request counts are summed through
prometheus_client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR, set by `sdqueue api`).
"""

from __future__ import annotations

import logging
import os
import time
from datetime import datetime, timezone
from typing import Iterator

import anyio
import anyio.to_thread
from fastapi import APIRouter, FastAPI, Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from sqlalchemy import func, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from models import metrics as names
from models.broker import model_queue_depths
from models.jobs import aware, queued_by_model
from models.registry import model_key
from models.tables import Job, JobState, Priority, WebhookAttempt, WebhookDelivery
from producer.api.app import Backend
from producer.api.errors import hide_secrets

log = logging.getLogger(__name__)

disable_created_metrics()  # no NAME_created series: rate() needs none

router = APIRouter(tags=["metrics"])

# A scrape that takes longer is answered 503 (Prometheus's own scrape timeout is 10 s).
SCRAPE_SECONDS = 8.0
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
DELIVERY_STATES = ("pending", "delivered", "failed")


class StateCollector:
    """The database's and the broker's numbers, read when scraped."""

    def __init__(self, shared: Backend):
        self.shared = shared

    def describe(self) -> list[Metric]:
        return []  # read at scrape time only

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(names.SOURCE_UP.name, names.SOURCE_UP.help, labels=names.SOURCE_UP.labels)
        for source, read in (("database", self._database), ("broker", self._broker)):
            try:
                families = list(read())
            except Exception as exc:
                log.warning("metrics: the %s did not answer: %s", source, hide_secrets(" ".join(str(exc).split())[:300]))
                up.add_metric([source], 0)
                continue
            up.add_metric([source], 1)
            yield from families
        yield up

    def _database(self) -> Iterator[Metric]:
        with self.shared.client.db.session() as session:
            jobs = session.execute(
                select(Job.state, Job.priority, func.count(), func.min(Job.created_at)).group_by(Job.state, Job.priority)
            ).all()
            deliveries = dict(session.execute(
                select(WebhookDelivery.state, func.count()).group_by(WebhookDelivery.state)).all())
            attempts = session.execute(
                select(WebhookAttempt.status_code, func.count()).group_by(WebhookAttempt.status_code)).all()
            by_model = queued_by_model(session)
        counts = {(state, priority): count for state, priority, count, _ in jobs}
        family = GaugeMetricFamily(names.JOBS.name, names.JOBS.help, labels=names.JOBS.labels)
        for state in sorted({s.value for s in JobState} | {s for s, _ in counts}):
            for priority in sorted({p.value for p in Priority} | {p for _, p in counts}):
                family.add_metric([state, priority], counts.get((state, priority), 0))
        yield family
        now = datetime.now(timezone.utc)
        oldest = {priority: aware(first) for state, priority, _, first in jobs if state == JobState.QUEUED.value}
        family = GaugeMetricFamily(names.OLDEST_QUEUED.name, names.OLDEST_QUEUED.help, labels=names.OLDEST_QUEUED.labels)
        for priority in sorted({p.value for p in Priority} | set(oldest)):
            first = oldest.get(priority)
            family.add_metric([priority], max(0.0, (now - first).total_seconds()) if first is not None else 0.0)
        yield family
        family = GaugeMetricFamily(names.QUEUED_BY_MODEL.name, names.QUEUED_BY_MODEL.help,
                                   labels=names.QUEUED_BY_MODEL.labels)
        for model in sorted(set(by_model) | {model_key(self.shared.settings.default_model)}):
            family.add_metric([model], by_model.get(model, 0))
        yield family
        family = GaugeMetricFamily(names.WEBHOOK_DELIVERIES.name, names.WEBHOOK_DELIVERIES.help,
                                   labels=names.WEBHOOK_DELIVERIES.labels)
        for state in sorted(set(DELIVERY_STATES) | set(deliveries)):
            family.add_metric([state], deliveries.get(state, 0))
        yield family
        by_result = dict.fromkeys(("2xx", "3xx", "4xx", "5xx", "error"), 0)
        for status, count in attempts:
            label = "error" if status is None else f"{status // 100}xx"
            by_result[label] = by_result.get(label, 0) + count
        family = CounterMetricFamily(names.WEBHOOK_ATTEMPTS.name, names.WEBHOOK_ATTEMPTS.help,
                                     labels=names.WEBHOOK_ATTEMPTS.labels)
        for label, count in by_result.items():
            family.add_metric([label], count)
        yield family

    def _broker(self) -> Iterator[Metric]:
        settings = self.shared.settings
        family = GaugeMetricFamily(names.QUEUE_DEPTH.name, names.QUEUE_DEPTH.help, labels=names.QUEUE_DEPTH.labels)
        for queue in model_queue_depths(self.shared.redis, settings):
            family.add_metric([queue["name"], queue["priority"], queue["model"]], queue["depth"])
        yield family


class Exposition:
    """The app's registry: its request metrics and the state collector."""

    def __init__(self, shared: Backend):
        self.registry = CollectorRegistry()
        self.state = StateCollector(shared)
        self.registry.register(self.state)  # type: ignore[arg-type]
        self.requests = Counter(names.API_REQUESTS.name, names.API_REQUESTS.help, names.API_REQUESTS.labels,
                                registry=self.registry)
        self.seconds = Histogram(names.API_REQUEST_SECONDS.name, names.API_REQUEST_SECONDS.help,
                                 names.API_REQUEST_SECONDS.labels, buckets=names.API_REQUEST_SECONDS.buckets,
                                 registry=self.registry)

    def render(self) -> bytes:
        if not os.environ.get(MULTIPROCESS_ENV):
            return generate_latest(self.registry)
        # Several API processes: the request metrics of all of them, from their files.
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        registry.register(self.state)  # type: ignore[arg-type]
        return generate_latest(registry)


class RequestMetrics:
    """Counts each answer by method, route template and status, and times it to its first byte
    (an event stream is timed to its headers, not to its end)."""

    def __init__(self, app: ASGIApp, exposition: Exposition):
        self.app = app
        self.exposition = exposition

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        clock = time.perf_counter()
        answered = False

        def count(status: int) -> None:
            nonlocal answered
            answered = True
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.exposition.requests.labels(scope["method"], route, str(status)).inc()
            self.exposition.seconds.labels(scope["method"], route).observe(time.perf_counter() - clock)

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start" and not answered:
                count(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            if not answered:
                count(500)


def install(app: FastAPI, shared: Backend) -> None:
    """/metrics on `app`, and its requests counted."""
    exposition = Exposition(shared)
    app.state.metrics = exposition
    app.add_middleware(RequestMetrics, exposition=exposition)
    app.include_router(router)


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    exposition: Exposition = request.app.state.metrics
    try:
        with anyio.fail_after(SCRAPE_SECONDS):
            body = await anyio.to_thread.run_sync(exposition.render, abandon_on_cancel=True)
    except TimeoutError:
        return Response(f"metrics took longer than {SCRAPE_SECONDS:g} s\n", status_code=503, media_type="text/plain")
    return Response(body, media_type=CONTENT_TYPE_LATEST)
