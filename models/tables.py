"""SQLAlchemy tables: runs, jobs, the images they produced, and the batches images ran in.

Schema changes go through Alembic (models/migrations); this module is what the migrations
build, and what `sdqueue db upgrade` brings a database to.
"""

from __future__ import annotations

import enum
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class JobState(str, enum.Enum):
    # A follow-up (`after`) whose parent has not succeeded yet: no message until it has.
    WAITING = "waiting"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


# Every state's name, in the order above: what counts by state list.
STATES = tuple(state.value for state in JobState)


class Priority(str, enum.Enum):
    """Interactive jobs go first; bulk jobs (runs) still get a share of the batches."""

    INTERACTIVE = "interactive"
    BULK = "bulk"


class Base(DeclarativeBase):
    type_annotation_map = {datetime: DateTime(timezone=True), dict[str, Any]: JSON}


class Run(Base):
    """A named set of jobs enqueued together: from a manifest, a grid, or a schedule's firing."""

    __tablename__ = "runs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    # The manifest or grid file as given, and the sha256 of its bytes.
    source: Mapped[str | None] = mapped_column(String(1024), default=None)
    source_sha256: Mapped[str | None] = mapped_column(String(64), default=None)
    # Request fields given as options: every row without its own value takes these.
    defaults: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    priority: Mapped[str] = mapped_column(String(16), default=Priority.BULK.value)
    # Set when a schedule's firing made the run: the schedule's name and the firing's time.
    schedule: Mapped[str | None] = mapped_column(String(255), default=None, index=True)
    fire_time: Mapped[datetime | None] = mapped_column(default=None)
    # Rows of the source that passed validation, and when all of them were written and sent.
    expected_jobs: Mapped[int | None] = mapped_column(Integer, default=None)
    sealed_at: Mapped[datetime | None] = mapped_column(default=None)
    # The enqueue writes a batch of rows (all with one created_at), sends their messages, then sets
    # this to that created_at: the run's queued rows created after it were written but not sent.
    sent_through: Mapped[datetime | None] = mapped_column(default=None)
    # The API key that made the run; None: the operator's (the CLI, a schedule).
    api_key_id: Mapped[str | None] = mapped_column(ForeignKey("api_keys.id"), default=None, index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class RunCount(Base):
    """A run's jobs and the images they ask for, in one state: what the changes in RunCountChange
    added up to when they were last folded (models/counts.py)."""

    __tablename__ = "run_counts"

    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    state: Mapped[str] = mapped_column(String(16), primary_key=True)
    jobs: Mapped[int] = mapped_column(BigInteger)
    images: Mapped[int] = mapped_column(BigInteger)


class RunCountChange(Base):
    """Jobs and images a statement moved into (positive) or out of (negative) a state of a run,
    written by the triggers on `jobs` (migration 0014) and folded into RunCount and RunRate. No
    foreign key: the jobs of a run being deleted write theirs after the run's row may be gone."""

    __tablename__ = "run_count_changes"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(String(36), index=True)
    state: Mapped[str] = mapped_column(String(16))
    jobs: Mapped[int] = mapped_column(Integer)
    images: Mapped[int] = mapped_column(Integer)
    bucket: Mapped[int] = mapped_column(BigInteger)  # the change's time, in Unix seconds, down to 10


class RunRate(Base):
    """Images of a run's jobs that succeeded within ten seconds from `bucket` (Unix seconds): its
    recent rate. Kept for an hour."""

    __tablename__ = "run_rates"

    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    bucket: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    images: Mapped[int] = mapped_column(BigInteger)


class ApiKey(Base):
    """A key of the HTTP API: what it may do, and the secret its webhooks are signed with. Only the
    sha256 of its token is stored; the token is shown once, when the key is made."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    token_prefix: Mapped[str] = mapped_column(String(16))  # the token's first characters, to tell keys apart
    webhook_secret: Mapped[str] = mapped_column(String(128))
    rate_per_minute: Mapped[int | None] = mapped_column(Integer, default=None)  # None: no limit
    max_queued: Mapped[int | None] = mapped_column(Integer, default=None)  # None: no cap
    bulk_only: Mapped[bool] = mapped_column(default=False)
    # An admin key sees every job and run (the operator's and other keys'), in the API and the dashboard.
    admin: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)


class IdempotentRequest(Base):
    """A POST made with an Idempotency-Key: its answer, given again to a retry of the same request."""

    __tablename__ = "idempotent_requests"

    scope: Mapped[str] = mapped_column(String(36), primary_key=True)  # the API key's id ("-": no auth)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    request_sha256: Mapped[str] = mapped_column(String(64))
    status_code: Mapped[int] = mapped_column(Integer)
    response: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_state_lease", "state", "lease_expires_at"),
        # A run's jobs in a state, newest first (its gallery: the succeeded ones), and its counts by
        # state with the images asked, from the index alone.
        Index("ix_jobs_run_state_created", "run_id", "state", "created_at", "id", postgresql_include=["num_images"]),
        # Newest first, paged by (created_at, id): every job, a key's, a run's (the API's lists, the dashboard)
        Index("ix_jobs_created", "created_at", "id"),
        Index("ix_jobs_key_created", "api_key_id", "created_at", "id"),
        Index("ix_jobs_run_created", "run_id", "created_at", "id"),
        UniqueConstraint("run_id", "run_key", name="uq_jobs_run_key"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    # Indexed through ix_jobs_state_lease, which starts with it.
    state: Mapped[str] = mapped_column(String(16), default=JobState.QUEUED.value)
    mode: Mapped[str] = mapped_column(String(8))  # txt2img | img2img | inpaint | upscale | depth
    # Every request field but the image bytes, with the seed as resolved at submit time.
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    seed: Mapped[int] = mapped_column(BigInteger)
    seed_was_drawn: Mapped[bool] = mapped_column(default=False)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    num_inference_steps: Mapped[int] = mapped_column(Integer)
    num_images: Mapped[int] = mapped_column(Integer)
    # img2img: the uploaded input image in storage, and its digest.
    input_key: Mapped[str | None] = mapped_column(String(512), default=None)
    input_sha256: Mapped[str | None] = mapped_column(String(64), default=None)
    # Inpainting: its mask in storage, and its digest.
    mask_key: Mapped[str | None] = mapped_column(String(512), default=None)
    mask_sha256: Mapped[str | None] = mapped_column(String(64), default=None)
    # A follow-up: the job whose image `after_index` is its input. It waits until that job
    # succeeded, then its input_key is that image's object; it is cancelled if that job does not.
    after_job_id: Mapped[str | None] = mapped_column(String(36), default=None, index=True)
    after_index: Mapped[int | None] = mapped_column(Integer, default=None)
    # Depth-to-image with the caller's depth map: it in storage, and its digest (None: estimated).
    depth_key: Mapped[str | None] = mapped_column(String(512), default=None)
    depth_sha256: Mapped[str | None] = mapped_column(String(64), default=None)
    # Which model ran it (registry name or folder), set by the worker.
    model: Mapped[str | None] = mapped_column(String(512), default=None)
    # Every claim counts an attempt; `failures` counts those that ended by the job's own fault (a
    # Python error, or its worker dying while it ran alone): SDQUEUE_MAX_ATTEMPTS of them dead-letter it.
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    failures: Mapped[int] = mapped_column(Integer, default=0)
    dead_letter: Mapped[bool] = mapped_column(default=False)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    worker: Mapped[str | None] = mapped_column(String(255), default=None)
    # The lease of the claim that runs it: only its holder (owner and token) may upload and record.
    # The token grows by one at every claim; object keys carry it, so a stale holder never
    # overwrites the objects of a newer claim.
    lease_owner: Mapped[str | None] = mapped_column(String(255), default=None)
    lease_token: Mapped[int] = mapped_column(Integer, default=0)
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    # The worker (lease owner) of each charged failure: it is dead-lettered only once it failed on
    # two of them (or on the only healthy one), never by one host's repeated fault.
    failed_on: Mapped[list[str] | None] = mapped_column(JSON, default=None)
    # Its worker died while it shared the GPU: it runs again with the other suspects of its group
    # and nothing else, so a job that kills its worker is found without charging its batch mates;
    # each death of a group splits it in halves (models/jobs.py `requeue_dead`).
    suspect: Mapped[bool] = mapped_column(default=False)
    suspect_group: Mapped[str | None] = mapped_column(String(36), default=None)
    # Set while it runs on the GPU with its suspect group only: a worker that dies then was killed
    # by one of that group (a group of one: by this job, which is charged).
    running_alone: Mapped[bool] = mapped_column(default=False)
    # Where its messages go, and when the last was sent: a queued job whose message the broker
    # lost is sent again, to its own queue. enqueued_at is None while a row written by the API's
    # batch submit has not been sent yet; a run's rows are written with it set, and the run's
    # `sent_through` says which were sent.
    queue: Mapped[str | None] = mapped_column(String(255), default=None)
    enqueued_at: Mapped[datetime | None] = mapped_column(default=None)
    priority: Mapped[str] = mapped_column(String(16), default=Priority.INTERACTIVE.value)
    # The run it belongs to (None: submitted on its own), and its stable key within the run.
    run_id: Mapped[str | None] = mapped_column(ForeignKey("runs.id"), default=None)
    run_key: Mapped[str | None] = mapped_column(String(255), default=None)
    # The API key that submitted it (None: the CLI, the client, a run), and where its end is POSTed.
    api_key_id: Mapped[str | None] = mapped_column(ForeignKey("api_keys.id"), default=None)
    webhook_url: Mapped[str | None] = mapped_column(String(2048), default=None)
    # The ends that are POSTed there (of succeeded, failed, cancelled); None: every end.
    webhook_events: Mapped[list[str] | None] = mapped_column(JSON, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    images: Mapped[list[Image]] = relationship(back_populates="job", order_by="Image.index", lazy="selectin")
    # Made when it ends, if it has a webhook_url (models.jobs.transition); its row goes with the job's.
    webhook: Mapped[WebhookDelivery | None] = relationship(lazy="selectin", passive_deletes=True)
    # The follow-ups of this job (`after_job_id`), oldest first: read only where a record shows them.
    followers: Mapped[list[Job]] = relationship(
        primaryjoin="Job.id == foreign(Job.after_job_id)", viewonly=True, order_by="Job.created_at", lazy="select")


class Batch(Base):
    """One run of the denoising loop on a worker: what it ran with, for reproduction."""

    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    worker: Mapped[str] = mapped_column(String(255))
    model: Mapped[str] = mapped_column(String(512))  # hub id or folder
    model_revision: Mapped[str | None] = mapped_column(String(255), default=None)
    scheduler: Mapped[str] = mapped_column(String(128))
    device: Mapped[str] = mapped_column(String(32))
    dtype: Mapped[str] = mapped_column(String(16))
    size: Mapped[int] = mapped_column(Integer)  # samples in the batch
    versions: Mapped[dict[str, Any]] = mapped_column(JSON)  # torch, diffusers, ... versions
    compat_key: Mapped[str | None] = mapped_column(String(64), default=None)  # mode, size, steps, start step
    jobs: Mapped[int | None] = mapped_column(Integer, default=None)
    seconds: Mapped[float | None] = mapped_column(Float, default=None)  # denoise + decode
    peak_memory_bytes: Mapped[int | None] = mapped_column(BigInteger, default=None)  # CUDA only
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)


class Upload(Base):
    """An object a claim is about to upload. Its row goes when the job records the object as one
    of its images; a row left behind (a cancelled, superseded or crashed claim) tells the sweeper
    which object to delete, with no listing of the bucket."""

    __tablename__ = "uploads"

    object_key: Mapped[str] = mapped_column(String(512), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    lease_token: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class Image(Base):
    __tablename__ = "images"
    __table_args__ = (UniqueConstraint("job_id", "index", name="uq_images_job_index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))  # indexed by uq_images_job_index
    index: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(BigInteger)
    object_key: Mapped[str] = mapped_column(String(512))
    sha256: Mapped[str] = mapped_column(String(64))  # of the PNG file, metadata included
    # Of the decoded pixels (RGB, row-major, 8 bits): what a re-made image is compared with.
    pixel_sha256: Mapped[str | None] = mapped_column(String(64), default=None)
    size_bytes: Mapped[int] = mapped_column(Integer)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    # The run that made it (worker, model, versions). Window batching: its batch, with the batch's
    # size and the image's position in it. Continuous batching: the jobs that finished in the same
    # step; size and position stay empty, and what it shared is below.
    batch_id: Mapped[str | None] = mapped_column(ForeignKey("batches.id"), default=None, index=True)
    batch_size: Mapped[int | None] = mapped_column(Integer, default=None)
    batch_position: Mapped[int | None] = mapped_column(Integer, default=None)
    # Continuous batching: model calls it ran in, the most samples one of them held (itself
    # included), and the mean over its calls.
    steps_run: Mapped[int | None] = mapped_column(Integer, default=None)
    shared_max: Mapped[int | None] = mapped_column(Integer, default=None)
    shared_mean: Mapped[float | None] = mapped_column(Float, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    job: Mapped[Job] = relationship(back_populates="images")


class WebhookDelivery(Base):
    """The POST of a job's final record to its webhook_url: made with the job's end, in the same
    transaction, and delivered by `sdqueue webhooks`, retried with back-off until it succeeds or
    SDQUEUE_WEBHOOK_RETRY_SECONDS pass."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_state_next", "state", "next_attempt_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), unique=True)
    url: Mapped[str] = mapped_column(String(2048))
    state: Mapped[str] = mapped_column(String(16), default="pending")  # pending | delivered | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)

    tries: Mapped[list[WebhookAttempt]] = relationship(order_by="WebhookAttempt.id", lazy="selectin")


class WebhookAttempt(Base):
    """One try of a delivery: when, what the receiver answered, or why it could not be reached."""

    __tablename__ = "webhook_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    delivery_id: Mapped[int] = mapped_column(ForeignKey("webhook_deliveries.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    status_code: Mapped[int | None] = mapped_column(Integer, default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    seconds: Mapped[float | None] = mapped_column(Float, default=None)
