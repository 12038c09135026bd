"""The Prometheus metrics of sdqueue, by name: what workers (worker/metrics.py, on
SDQUEUE_METRICS_PORT) and the API (producer/api/metrics.py, `GET /metrics`) export, and what the
Grafana dashboard (deploy/grafana/) plots. Names and help only: no client library here.

A counter's name ends in `_total`; a histogram is scraped as NAME_bucket, NAME_sum and NAME_count.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    name: str
    kind: str  # counter | gauge | histogram
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()  # histograms only

    @property
    def series(self) -> tuple[str, ...]:
        """The names of the series it is scraped as."""
        if self.kind == "histogram":
            return (f"{self.name}_bucket", f"{self.name}_sum", f"{self.name}_count")
        return (self.name,)


# Seconds from a fraction of a second to an hour: time in queue and on the GPU.
_WAIT_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600)

# --- a worker process --------------------------------------------------------------------------

WORKER_INFO = Metric("sdqueue_worker_info", "gauge", "1 per worker process: its name, model, device and batching",
                     ("worker", "model", "device", "batching"))
IMAGES = Metric("sdqueue_worker_images_total", "counter", "images made, stored and recorded (images/s: its rate)")
PNG_SECONDS = Metric("sdqueue_worker_png_encode_seconds_total", "counter",
                     "CPU seconds the worker's threads spent encoding PNGs (with their metadata)")
JOBS_ENDED = Metric("sdqueue_worker_jobs_ended_total", "counter",
                    "jobs this worker held that ended, by how (worker/engine.py: succeeded, failed, retry, "
                    "dead-lettered, lost, released)", ("outcome",))
FAILURES = Metric("sdqueue_worker_failures_total", "counter",
                  "jobs failed or attempts charged, by reason: a JobError's (prompt-unparsable, "
                  "conditioning-not-finite, latents-not-finite, pixels-not-finite, input-unreadable), "
                  "out-of-memory, or the unexpected error's class", ("reason",))
OUT_OF_MEMORY = Metric("sdqueue_worker_out_of_memory_total", "counter",
                       "CUDA out-of-memory errors recovered from: a loop shed its newest jobs, or a window batch split")
OCCUPANCY = Metric("sdqueue_worker_loop_occupancy", "histogram", "samples (images) in one UNet call",
                   buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64))
STEP_SECONDS = Metric("sdqueue_worker_step_seconds", "histogram",
                      "seconds of one denoising step (one UNet call; window batching: a batch's time over its steps)",
                      buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
QUEUE_SECONDS = Metric("sdqueue_worker_queue_seconds", "histogram",
                       "seconds from a job's creation to its first claim by a worker", buckets=_WAIT_BUCKETS)
GPU_SECONDS = Metric("sdqueue_worker_gpu_seconds", "histogram",
                     "seconds from a job joining its loop (or batch) to its images being made", buckets=_WAIT_BUCKETS)
JOBS_HELD = Metric("sdqueue_worker_jobs_held", "gauge", "jobs the worker holds a lease on (waiting or running)")
GPU_MEMORY_ALLOCATED = Metric("sdqueue_worker_gpu_memory_allocated_bytes", "gauge",
                              "CUDA memory held by tensors (torch.cuda.memory_allocated)", ("device",))
GPU_MEMORY_RESERVED = Metric("sdqueue_worker_gpu_memory_reserved_bytes", "gauge",
                             "CUDA memory reserved by the caching allocator (torch.cuda.memory_reserved)", ("device",))
GPU_UTILIZATION = Metric("sdqueue_worker_gpu_utilization_ratio", "gauge",
                         "share of the last sample period a kernel ran on the GPU (NVML; absent without it)", ("device",))

QUARANTINED = Metric("sdqueue_worker_quarantined", "gauge",
                     "1 while the worker is quarantined: it saw a fault of its host and takes no work until a "
                     "probe passes (worker/quarantine.py)")
SPOOL_BYTES = Metric("sdqueue_worker_spool_bytes", "gauge", "images waiting in the spool for the object store")
SPOOL_DISK_FULL = Metric("sdqueue_worker_spool_disk_full", "gauge",
                         "1 while the spool's disk is too full to take images: no new batch starts")

WORKER = (WORKER_INFO, IMAGES, PNG_SECONDS, JOBS_ENDED, FAILURES, OUT_OF_MEMORY, OCCUPANCY, STEP_SECONDS, QUEUE_SECONDS,
          GPU_SECONDS, JOBS_HELD, GPU_MEMORY_ALLOCATED, GPU_MEMORY_RESERVED, GPU_UTILIZATION, QUARANTINED,
          SPOOL_BYTES, SPOOL_DISK_FULL)

# --- the API: the database and the broker, read at every scrape --------------------------------

JOBS = Metric("sdqueue_jobs", "gauge", "jobs in the database, by state and priority", ("state", "priority"))
OLDEST_QUEUED = Metric("sdqueue_jobs_oldest_queued_seconds", "gauge",
                       "age of the oldest queued job, by priority", ("priority",))
QUEUE_DEPTH = Metric("sdqueue_queue_depth", "gauge",
                     "messages waiting in a Redis queue (LLEN): each model's queues that hold any, and the default "
                     "model's", ("queue", "priority", "model"))
QUEUED_BY_MODEL = Metric("sdqueue_jobs_queued_by_model", "gauge",
                         "queued jobs by the model they wait for: a model no worker serves keeps its jobs here",
                         ("model",))
WEBHOOK_DELIVERIES = Metric("sdqueue_webhook_deliveries", "gauge",
                            "webhook deliveries by state (pending, delivered, failed)", ("state",))
WEBHOOK_ATTEMPTS = Metric("sdqueue_webhook_attempts_total", "counter",
                          "webhook POSTs tried, by result: the status class (2xx, 3xx, 4xx, 5xx) or error", ("result",))
SOURCE_UP = Metric("sdqueue_metrics_source_up", "gauge",
                   "1 when the source (database, broker) answered this scrape, 0 when not", ("source",))
API_REQUESTS = Metric("sdqueue_api_requests_total", "counter", "HTTP requests answered by the API",
                      ("method", "route", "status"))
API_REQUEST_SECONDS = Metric("sdqueue_api_request_seconds", "histogram",
                             "seconds until the API started its answer (an event stream: its headers)",
                             ("method", "route"), buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))

API = (JOBS, OLDEST_QUEUED, QUEUED_BY_MODEL, QUEUE_DEPTH, WEBHOOK_DELIVERIES, WEBHOOK_ATTEMPTS, SOURCE_UP, API_REQUESTS,
       API_REQUEST_SECONDS)

ALL = WORKER + API


def series_names() -> set[str]:
    """Every series name sdqueue exports."""
    return {series for metric in ALL for series in metric.series}
