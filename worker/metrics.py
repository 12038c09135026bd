"""A worker process's Prometheus metrics (names and help: models/metrics.py), served over HTTP on
SDQUEUE_METRICS_HOST:SDQUEUE_METRICS_PORT (loopback unless told otherwise) by `serve`, which WorkerContext.open calls.

The engine and the task threads record through the functions below (a lock and an add each: cheap
enough for the GPU thread between steps). What is read rather than counted (jobs held, CUDA
memory and utilisation) is read at each scrape by `EngineCollector`.
"""

from __future__ import annotations

import errno
import logging
import threading
from datetime import datetime
from typing import Any, Iterable, Iterator

from prometheus_client import REGISTRY, Counter, Histogram, disable_created_metrics, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric

from models import metrics as names
from models.errors import JobError
from models.settings import Settings

log = logging.getLogger(__name__)

disable_created_metrics()  # no NAME_created series: rate() needs none

# Several workers on one host: the first takes SDQUEUE_METRICS_PORT, the next the port after it, ...
PORT_TRIES = 16

IMAGES = Counter(names.IMAGES.name, names.IMAGES.help)
PNG_SECONDS = Counter(names.PNG_SECONDS.name, names.PNG_SECONDS.help)
JOBS_ENDED = Counter(names.JOBS_ENDED.name, names.JOBS_ENDED.help, names.JOBS_ENDED.labels)
FAILURES = Counter(names.FAILURES.name, names.FAILURES.help, names.FAILURES.labels)
OUT_OF_MEMORY = Counter(names.OUT_OF_MEMORY.name, names.OUT_OF_MEMORY.help)
OCCUPANCY = Histogram(names.OCCUPANCY.name, names.OCCUPANCY.help, buckets=names.OCCUPANCY.buckets)
STEP_SECONDS = Histogram(names.STEP_SECONDS.name, names.STEP_SECONDS.help, buckets=names.STEP_SECONDS.buckets)
QUEUE_SECONDS = Histogram(names.QUEUE_SECONDS.name, names.QUEUE_SECONDS.help, buckets=names.QUEUE_SECONDS.buckets)
GPU_SECONDS = Histogram(names.GPU_SECONDS.name, names.GPU_SECONDS.help, buckets=names.GPU_SECONDS.buckets)


def ended(outcome: str) -> None:
    JOBS_ENDED.labels(outcome).inc()


def failed(error: BaseException) -> None:
    FAILURES.labels(reason_of(error)).inc()


def reason_of(error: BaseException) -> str:
    """A JobError's reason, out-of-memory, or the unexpected error's class (a bounded set)."""
    if isinstance(error, JobError):
        return error.reason
    from worker.samples import is_out_of_memory

    return "out-of-memory" if is_out_of_memory(error) else type(error).__name__


def steps(samples: int, seconds: float, count: int = 1) -> None:
    """`count` UNet calls of `samples` samples each, `seconds` each."""
    for _ in range(count):
        OCCUPANCY.observe(samples)
        STEP_SECONDS.observe(seconds)


def claimed(created_at: datetime | None, claimed_at: datetime | None) -> None:
    if created_at is not None and claimed_at is not None:
        QUEUE_SECONDS.observe(max(0.0, (claimed_at - created_at).total_seconds()))


def on_gpu(seconds: Iterable[float]) -> None:
    for value in seconds:
        GPU_SECONDS.observe(value)


class EngineCollector:
    """What is read at each scrape: the worker's name and set-up, the jobs it holds, CUDA memory
    and utilisation (NVML's, where torch can read it; absent on the CPU)."""

    def __init__(self) -> None:
        self.engine: Any = None  # worker.engine.Engine of this process, while it serves

    def describe(self) -> list[Metric]:
        return []  # read at scrape time only

    def collect(self) -> Iterator[Metric]:
        engine = self.engine
        if engine is None:
            return
        model = engine.model
        info = GaugeMetricFamily(names.WORKER_INFO.name, names.WORKER_INFO.help, labels=names.WORKER_INFO.labels)
        info.add_metric([engine.hostname, model.spec.name, model.device, engine.batching], 1)
        yield info
        yield GaugeMetricFamily(names.JOBS_HELD.name, names.JOBS_HELD.help, value=len(engine._held))
        yield GaugeMetricFamily(names.QUARANTINED.name, names.QUARANTINED.help, value=int(engine.quarantined))
        spool = engine.spool
        if spool is not None:
            yield GaugeMetricFamily(names.SPOOL_BYTES.name, names.SPOOL_BYTES.help, value=spool.bytes)
            yield GaugeMetricFamily(names.SPOOL_DISK_FULL.name, names.SPOOL_DISK_FULL.help, value=int(spool.disk_full))
        if model.device.startswith("cuda"):
            yield from self._cuda(model.device)

    def _cuda(self, device: str) -> Iterator[Metric]:
        import torch

        where = torch.device(device)
        for metric, read in ((names.GPU_MEMORY_ALLOCATED, torch.cuda.memory_allocated),
                             (names.GPU_MEMORY_RESERVED, torch.cuda.memory_reserved)):
            family = GaugeMetricFamily(metric.name, metric.help, labels=metric.labels)
            family.add_metric([device], read(where))
            yield family
        try:
            percent = torch.cuda.utilization(where)
        except Exception:  # no NVML (pynvml / nvidia-ml-py) in this environment
            return
        family = GaugeMetricFamily(names.GPU_UTILIZATION.name, names.GPU_UTILIZATION.help,
                                   labels=names.GPU_UTILIZATION.labels)
        family.add_metric([device], percent / 100)
        yield family


COLLECTOR = EngineCollector()
REGISTRY.register(COLLECTOR)  # type: ignore[arg-type]


class MetricsServer:
    """The HTTP server of /metrics, in a daemon thread."""

    def __init__(self, server: Any, thread: threading.Thread, port: int):
        self.server, self.thread, self.port = server, thread, port

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def serve(settings: Settings, engine: Any) -> MetricsServer | None:
    """Serve this process's metrics on SDQUEUE_METRICS_HOST at SDQUEUE_METRICS_PORT, or the next free
    port of PORT_TRIES; None when it is 0 or no port is free (the worker runs on without metrics)."""
    COLLECTOR.engine = engine
    first = settings.metrics_port
    if first == 0:
        return None
    for port in range(first, min(first + PORT_TRIES, 65536)):
        try:
            server, thread = start_http_server(port, addr=settings.metrics_host)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                continue
            log.warning("metrics cannot be served on %s port %d (%s): none are served", settings.metrics_host, port, exc)
            return None
        (log.info if port == first else log.warning)("metrics served on %s port %d at /metrics",
                                                      settings.metrics_host, port)
        return MetricsServer(server, thread, port)
    log.warning("ports %d to %d are all taken: this worker serves no metrics", first, port)
    return None


def stop(server: MetricsServer | None) -> None:
    COLLECTOR.engine = None
    if server is not None:
        server.close()
