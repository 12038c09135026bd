"""SQLAlchemy tables: jobs, the images they produced, and the batches images ran in.

Schema changes go through Alembic (models/migrations); this module is what the migrations
build, and what `sdqueue db upgrade` brings a database to.
"""

from __future__ import annotations

import enum
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class JobState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: DateTime(timezone=True), dict[str, Any]: JSON}


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    state: Mapped[str] = mapped_column(String(16), index=True, default=JobState.QUEUED.value)
    mode: Mapped[str] = mapped_column(String(8))  # txt2img | img2img
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
    # Which model ran it (registry name or folder), set by the worker.
    model: Mapped[str | None] = mapped_column(String(512), default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    worker: Mapped[str | None] = mapped_column(String(255), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    images: Mapped[list[Image]] = relationship(back_populates="job", order_by="Image.index", lazy="selectin")


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


class Image(Base):
    __tablename__ = "images"
    __table_args__ = (UniqueConstraint("job_id", "index", name="uq_images_job_index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    index: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(BigInteger)
    object_key: Mapped[str] = mapped_column(String(512))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(Integer)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    batch_id: Mapped[str | None] = mapped_column(ForeignKey("batches.id"), default=None, index=True)
    batch_size: Mapped[int | None] = mapped_column(Integer, default=None)
    batch_position: Mapped[int | None] = mapped_column(Integer, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    job: Mapped[Job] = relationship(back_populates="images")
