"""One settings object, read from the environment (SDQUEUE_*), validated when it is made.

The defaults are the embedded set-up: an in-process broker, a SQLite file and a local folder
under the data directory, so a single machine runs with no services at all.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from models.constants import DEFAULT_QUEUE
from models.errors import ConfigError

BROKER_SCHEMES = ("memory", "redis", "rediss")
STORAGE_SCHEMES = ("file", "s3")


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "sdqueue"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SDQUEUE_", extra="ignore", protected_namespaces=())

    data_dir: Path = Field(default_factory=default_data_dir)
    # memory:// is the in-process broker: only a worker in the same process (the demo) sees it.
    broker_url: str = "memory://"
    database_url: str = ""  # empty: a SQLite file in data_dir
    storage_url: str = ""  # empty: a folder in data_dir
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    # The model this process's worker pins (`sdqueue worker --model`): it consumes that model's queues.
    model: str = "sd21"
    # The model of a request that names none (empty: SDQUEUE_MODEL's value, so that a deployment of
    # one model sets one variable).
    default_model: str = ""
    # Folders under which a request may name a diffusers folder as its model (comma-separated;
    # empty: requests name registry models only). A worker may pin any folder it is given.
    model_folders: str = ""
    queue: str = DEFAULT_QUEUE
    # "auto" takes CUDA when there is one; the worker runs fp16 on CUDA and fp32 on the CPU.
    device: str = "auto"
    # Unacknowledged messages come back to the queue after this many seconds (Redis transport):
    # a backstop only; leases in the database decide who runs a job.
    visibility_timeout: int = 3600
    # Attempts that end by the job's own fault (a Python error, or its worker dying while it ran
    # alone) before it is failed and dead-lettered. Outages and shutdowns are not counted.
    max_attempts: int = Field(default=3, ge=1)
    # A worker's claim on a job lasts this long unless its heartbeat (every heartbeat_seconds)
    # pushes it forward: a killed worker's jobs run again about lease_seconds + sweep_interval later.
    lease_seconds: float = Field(default=30, gt=0)
    heartbeat_seconds: float = Field(default=5, gt=0)
    # How often each worker sweeps (expired leases, lost messages, orphan objects); `sdqueue sweep` once.
    sweep_interval: float = Field(default=10, gt=0)
    # A queued job whose message is not in the broker this long after it was sent is sent again.
    requeue_after: float = Field(default=60, gt=0)
    # Objects of cancelled, superseded or crashed claims are deleted this long after their upload.
    orphan_grace: float = Field(default=600, ge=0)
    # How long an outage of the database, broker or storage is waited out before a worker gives a
    # job back (it is never failed for it).
    outage_timeout: float = Field(default=1800, gt=0)
    # Finished images wait here while the object store is down; when it holds spool_max_bytes the
    # worker stops starting batches until uploads drain it. Empty: the data dir's spool/.
    spool_dir: Path | None = None
    spool_max_bytes: int = Field(default=2 * 2**30, gt=0)
    # The spool's disk: while the spool is in use with less than this free, or once an image did not
    # fit, the worker starts no batch until there is room again (or the object store is back).
    spool_min_free_bytes: int = Field(default=256 * 2**20, ge=0)
    # Batching: the most pixels (width x height x images) one denoising loop holds; 0 sizes it
    # from the GPU's memory (8 images of 768x768 on an 80 GB card).
    pixel_budget: int = Field(default=0, ge=0)
    # How long a batch that is not full waits for more compatible jobs (window batching only).
    batch_window_ms: int = Field(default=100, ge=0, le=60_000)
    # "continuous": jobs of one size join a running denoising loop at the next step and leave when
    # their own steps end (steps, strength and guidance may differ); "window": a batch of jobs that
    # share size, steps and strength forms in a window and runs to its end (the older engine).
    batching: Literal["continuous", "window"] = "continuous"
    # SDQUEUE_MODEL=standin (worker/standin.py): its modelled GPU time is multiplied by this; 0
    # sleeps not at all (the control plane at full speed).
    standin_scale: float = Field(default=1.0, ge=0, le=1000)
    # torch.compile of the UNet per (size, batch bucket): "auto" is "default" on CUDA and "off"
    # on the CPU; "max-autotune" compiles longer for faster kernels (and CUDA graphs).
    compile: Literal["auto", "off", "default", "max-autotune"] = "auto"
    # Sizes whose graphs compile at worker start, before it takes jobs ("768x768,512x512"); empty:
    # the model's native size. Other sizes compile on their first job.
    warmup_sizes: str = ""
    # Jobs a worker holds at once (Celery thread slots): what its batches are gathered from.
    worker_slots: int = Field(default=16, ge=1, le=1024)
    # Bulk jobs (runs, and batches sent at the bulk priority) travel this many to a broker message:
    # a worker takes them together, claims them in one statement, and acknowledges the message
    # once all have ended, so Celery's cost of a message is paid once for them all. Each job keeps
    # its own lease. A worker then holds up to worker_slots x this many bulk jobs; 1 sends one job
    # a message, as interactive jobs always are.
    jobs_per_message: int = Field(default=8, ge=1, le=256)
    # Interactive jobs go before bulk ones (runs), but while bulk jobs wait, at least one batch in
    # this many is led by the oldest job whatever its priority: 1 ignores priorities then.
    bulk_share: int = Field(default=4, ge=1)
    # Quarantine (worker/quarantine.py): a worker that fails this many different jobs in a row with
    # the same error, while other workers succeed with jobs like them, stops taking work as it
    # does on a fault of its host; it probes itself first after probe_interval seconds, then at
    # twice the interval after each failed probe (up to 10 minutes). quarantine_exit: 0 stays up
    # and probes; any other value is the status the worker exits with, for its orchestrator to
    # restart or replace it.
    quarantine_after: int = Field(default=3, ge=2, le=1000)
    probe_interval: float = Field(default=30, gt=0, le=3600)
    quarantine_exit: int = Field(default=0, ge=0, le=255)

    # The HTTP API (`sdqueue api`): "on" needs a key (`sdqueue keys create`) on every request but
    # /healthz and /readyz; "off" is for a trusted network only, and says so loudly at start.
    api_auth: str = "on"
    # The largest request body the API reads (JSON or multipart with the img2img image).
    api_max_body_bytes: int = Field(default=24 * 2**20, gt=0)
    # How long a presigned image URL the API hands out stays valid.
    api_url_seconds: int = Field(default=300, gt=0, le=7 * 24 * 3600)
    # How long the presigned URLs of a run's dataset exported to S3 (GET /v1/runs/{name}/export?to=s3) stay valid.
    api_export_url_seconds: int = Field(default=3600, gt=0, le=7 * 24 * 3600)
    # Event streams (GET /v1/jobs/{id}/events) one API key may hold open at once, across all API
    # processes: each holds a Redis connection. One more is refused with 429.
    api_max_streams_per_key: int = Field(default=16, ge=1, le=100_000)
    # Webhooks: a delivery is retried with exponential back-off for this long after the job ended;
    # each try ends within webhook_timeout in all (looking the host up, connecting, sending and the
    # whole answer: a receiver answering a byte at a time holds a deliverer no longer, and the try
    # failed); URLs to loopback, link-local and private addresses are refused unless webhook_allow_private.
    webhook_retry_seconds: float = Field(default=3600, gt=0)
    webhook_timeout: float = Field(default=10, gt=0)
    webhook_allow_private: bool = False
    # Private receivers allowed all the same, while every other private address stays refused:
    # "10.1.0.0/16,hooks.internal,...", networks (CIDR or one address) and host names (exact).
    webhook_allow: str = ""
    # How long the presigned URL of each image in a webhook's body stays valid (S3 allows 7 days).
    webhook_url_seconds: int = Field(default=3600, gt=0, le=7 * 24 * 3600)
    # Workers publish a job's denoising progress at most this often (seconds), through Redis.
    progress_interval: float = Field(default=0.25, gt=0)
    # Workers publish their status (what they run, images/s) this often, for `sdqueue top`; a
    # status not renewed for three intervals is gone (its worker was killed).
    status_interval: float = Field(default=2.0, gt=0)
    # Each worker serves Prometheus metrics over HTTP here (0: none). When the port is taken (several
    # workers on one host) it takes the next free one of the 16 from it, and logs which.
    metrics_port: int = Field(default=9300, ge=0, le=65535)
    # The address that metrics server listens on: loopback unless a scraper elsewhere needs it
    # (the deploy manifests set 0.0.0.0).
    metrics_host: str = "127.0.0.1"
    # torch's intra-op threads of a CPU worker (0: automatic, the host's usable cores divided
    # among its workers_per_host sdqueue workers, at least 1). CUDA workers keep torch's default.
    torch_threads: int = Field(default=0, ge=0, le=1024)
    workers_per_host: int = Field(default=1, ge=1, le=1024)
    # How the long-running commands log (worker, api, webhooks, beat, sweep, run): "text" lines, or
    # "json", one object a line with the job, run and batch ids it is about (models/logs.py).
    log_format: Literal["text", "json"] = "text"

    @model_validator(mode="after")
    def _fill_defaults(self) -> Settings:
        if not self.default_model:
            self.default_model = self.model
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'sdqueue.db'}"
        if not self.storage_url:
            self.storage_url = (self.data_dir / "storage").resolve().as_uri()
        if self.spool_dir is None:
            self.spool_dir = self.data_dir / "spool"
        if self.heartbeat_seconds * 2 > self.lease_seconds:
            raise ValueError(
                f"SDQUEUE_HEARTBEAT_SECONDS={self.heartbeat_seconds:g} must be at most half of "
                f"SDQUEUE_LEASE_SECONDS={self.lease_seconds:g}: a lease must survive a missed heartbeat"
            )
        return self

    @field_validator("warmup_sizes")
    @classmethod
    def _check_sizes(cls, value: str) -> str:
        for size in filter(None, (part.strip() for part in value.split(","))):
            width, _, height = size.partition("x")
            if not (width.isdigit() and height.isdigit() and int(width) % 8 == 0 and int(height) % 8 == 0):
                raise ValueError(f"SDQUEUE_WARMUP_SIZES={value!r}: {size!r} is not WIDTHxHEIGHT in multiples of 8")
        return value

    @property
    def model_folder_list(self) -> list[Path]:
        return [Path(part.strip()).expanduser().resolve() for part in self.model_folders.split(",") if part.strip()]

    @property
    def warmup_size_list(self) -> list[tuple[int, int]]:
        sizes = (part.strip().partition("x") for part in self.warmup_sizes.split(",") if part.strip())
        return [(int(width), int(height)) for width, _, height in sizes]

    @field_validator("broker_url")
    @classmethod
    def _check_broker(cls, value: str) -> str:
        scheme = urlparse(value).scheme
        if scheme not in BROKER_SCHEMES:
            raise ValueError(f"SDQUEUE_BROKER_URL={value!r}: scheme must be one of {', '.join(BROKER_SCHEMES)}")
        return value

    @field_validator("storage_url")
    @classmethod
    def _check_storage(cls, value: str) -> str:
        if not value:
            return value
        parsed = urlparse(value)
        if parsed.scheme not in STORAGE_SCHEMES:
            raise ValueError(f"SDQUEUE_STORAGE_URL={value!r}: scheme must be file:// or s3://")
        if parsed.scheme == "s3" and not parsed.netloc:
            raise ValueError(f"SDQUEUE_STORAGE_URL={value!r}: s3:// needs a bucket, e.g. s3://images/sdqueue")
        return value

    @field_validator("webhook_allow")
    @classmethod
    def _check_webhook_allow(cls, value: str) -> str:
        import ipaddress

        for entry in filter(None, (part.strip() for part in value.split(","))):
            try:
                ipaddress.ip_network(entry, strict=False)
                continue
            except ValueError:
                pass
            labels = entry.rstrip(".").split(".")
            if not all(0 < len(label) <= 63 and label.isascii() and label.replace("-", "").replace("_", "").isalnum()
                       for label in labels):
                raise ValueError(f"SDQUEUE_WEBHOOK_ALLOW={value!r}: {entry!r} is neither a network "
                                 "(10.0.0.0/8, fd00::/8, 10.1.2.3) nor a host name")
        return value

    @property
    def webhook_allow_list(self) -> tuple[str, ...]:
        return tuple(part.strip() for part in self.webhook_allow.split(",") if part.strip())

    @field_validator("api_auth")
    @classmethod
    def _check_api_auth(cls, value: str) -> str:
        if value not in ("on", "off"):
            raise ValueError(f"SDQUEUE_API_AUTH={value!r}: must be on or off")
        return value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if value != "auto" and value != "cpu" and not value.startswith("cuda"):
            raise ValueError(f"SDQUEUE_DEVICE={value!r}: must be auto, cpu, cuda or cuda:N")
        return value

    @property
    def in_process_broker(self) -> bool:
        return urlparse(self.broker_url).scheme == "memory"


def _problem(error: dict) -> str:
    """One validation error, naming the variable unless the message does (the validators' own)."""
    text = str(error.get("ctx", {}).get("error", error["msg"]))
    if error.get("loc") and "SDQUEUE_" not in text:
        name = "SDQUEUE_" + str(error["loc"][0]).upper()
        text = f"{name}={error.get('input')!r}: {text}"
    return text


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment, with explicit overrides; a bad value is a ConfigError."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValueError as exc:
        errors = getattr(exc, "errors", None)
        if callable(errors):
            problems = "; ".join(_problem(e) for e in errors())
            raise ConfigError(f"bad setting: {problems}") from None
        raise ConfigError(f"bad setting: {exc}") from None
