"""The Python client: submit a request, read a job, wait for it, fetch its images.

Order of a submit: validate everything, store the img2img input, write the job row, then send
the message. A request that fails validation leaves no trace; when the message cannot be sent the
row and the input are taken back, so the caller's error means nothing was enqueued. A producer
killed between the row and the send leaves a queued job the sweeper sends later.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
import uuid
from pathlib import Path
from typing import Any

from celery import Celery

from sqlalchemy import delete

from models import jobs
from models.broker import announce_cancel
from models.constants import GENERATE_TASK, queue_for
from models.db import Database
from models.errors import BadDestination, ConfigError, InvalidRequest, JobTimeout, ServiceUnavailable
from models.request import GenerationRequest, parse_request
from models.settings import Settings, load_settings
from models.storage import input_key_for, open_storage
from models.tables import Job, JobState, Priority, utcnow

# A drawn seed stays short enough to read and type back.
DRAWN_SEED_BOUND = 2**32


def make_sender(settings: Settings) -> Celery:
    """A Celery app that only sends messages, by task name: no worker code is imported."""
    sender = Celery("sdqueue-producer", broker=settings.broker_url, set_as_current=False)
    sender.conf.update(task_serializer="json", accept_content=["json"], broker_connection_retry_on_startup=True)
    return sender


class Client:
    def __init__(self, settings: Settings | None = None, *, sender: Celery | None = None):
        self.settings = settings or load_settings()
        self.db = Database(self.settings.database_url)
        self.storage = open_storage(
            self.settings.storage_url, endpoint_url=self.settings.s3_endpoint_url, region=self.settings.s3_region
        )
        self._sender = sender
        self._publisher: Any = None

    @property
    def sender(self) -> Celery:
        if self._sender is None:
            if self.settings.in_process_broker:
                raise ConfigError(
                    "SDQUEUE_BROKER_URL is memory:// (the in-process broker of `sdqueue demo`): no worker would "
                    "see this job. Set SDQUEUE_BROKER_URL=redis://HOST:6379/0 and run `sdqueue worker`"
                )
            self._sender = make_sender(self.settings)
        return self._sender

    def submit(self, request: GenerationRequest | dict[str, Any], *, priority: str = Priority.INTERACTIVE.value) -> str:
        """Validate, record and enqueue one job; returns its id."""
        # 1. validate (raises InvalidRequest) and check we can send at all, before any write
        if not isinstance(request, GenerationRequest):
            request = parse_request(request)
        priority = check_priority(priority)
        queue = queue_for(self.settings.queue, priority)
        self.sender  # noqa: B018  (refuses the in-process broker before anything is written)
        # 2. resolve the seed: a drawn seed is recorded like a given one
        job_id = str(uuid.uuid4())
        seed = request.seed if request.seed is not None else secrets.randbelow(DRAWN_SEED_BOUND)
        params = {**request.parameters(), "seed": seed}
        # 3. the img2img input goes to storage before the row that names it
        input_key = input_sha256 = None
        if request.image is not None:
            input_key = input_key_for(job_id)
            input_sha256 = hashlib.sha256(request.image).hexdigest()
            self.storage.put(input_key, request.image)
        # 4. the row, then the message
        with self.db.session() as session:
            session.add(
                Job(
                    id=job_id, state=JobState.QUEUED.value, mode=request.mode, params=params, seed=seed,
                    seed_was_drawn=request.seed is None, width=request.width, height=request.height,
                    num_inference_steps=request.num_inference_steps, num_images=request.num_images,
                    input_key=input_key, input_sha256=input_sha256, queue=queue, enqueued_at=utcnow(),
                    priority=priority,
                )
            )
        try:
            self.send([job_id], queue)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            raise ServiceUnavailable(
                f"broker {self.settings.broker_url} cannot be reached ({reason}): {self._take_back(job_id, input_key)}"
            ) from exc
        return job_id

    def send(self, job_ids: list[str], queue: str | None = None) -> None:
        """The jobs' messages, one per job, pipelined through one connection; the job id is the task id."""
        sender = self.sender
        queue = queue or self.settings.queue
        if self._publisher is None and not self.settings.in_process_broker:
            from producer.publish import BulkPublisher

            self._publisher = BulkPublisher(sender, self.settings.broker_url)
        if self._publisher is not None:
            self._publisher.send(job_ids, queue)
            return
        with sender.producer_or_acquire() as producer:
            for job_id in job_ids:
                sender.send_task(GENERATE_TASK, args=[job_id], task_id=job_id, queue=queue, producer=producer)

    def _take_back(self, job_id: str, input_key: str | None) -> str:
        """Undo a submit whose message could not be sent; says what became of the job."""
        try:
            with self.db.session() as session:
                session.execute(delete(Job).where(Job.id == job_id, Job.state == JobState.QUEUED.value))
        except Exception:
            return f"job {job_id} stays recorded as queued and the sweeper sends it once the broker is back"
        if input_key is not None:
            try:
                self.storage.delete(input_key)
            except Exception:  # an input no job names is harmless; the row is what counts
                pass
        return "nothing was enqueued"

    def get(self, job_id: str) -> dict[str, Any]:
        """The job's whole record (raises JobNotFound)."""
        with self.db.session() as session:
            return jobs.job_record(jobs.get_job(session, job_id), locate=self.storage.location)

    def wait(self, job_id: str, timeout: float | None = None, poll: float = 0.25) -> dict[str, Any]:
        """Block until the job ends; returns its record (raises JobTimeout)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            record = self.get(job_id)
            if JobState(record["state"]).terminal:
                return record
            if deadline is not None and time.monotonic() >= deadline:
                raise JobTimeout(job_id, record["state"], timeout or 0)
            time.sleep(poll)

    def fetch(self, job_id: str, dest: Path | str) -> list[Path]:
        """Download the job's images into the folder `dest` as JOBID-INDEX.png; returns the paths.

        Raises BadDestination, before anything is downloaded, when `dest` is not a folder that can be
        made and written to.
        """
        # 1. the destination: a writable folder, or a refusal before anything is downloaded
        dest = Path(dest)
        try:
            dest.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise BadDestination(f"destination {str(dest)!r} exists and is not a folder") from None
        except OSError as exc:
            raise BadDestination(f"destination {str(dest)!r} cannot be created ({exc.strerror or exc})") from None
        if not os.access(dest, os.W_OK | os.X_OK):
            raise BadDestination(f"destination {str(dest)!r} is not a writable folder")
        images = self.get(job_id)["images"]
        targets = [dest / f"{job_id}-{image['index']}.png" for image in images]
        for path in targets:
            if path.exists() and not path.is_file():
                raise BadDestination(f"destination {str(path)!r} exists and is not a regular file")
        # 2. each image to a temporary file beside its final name, then renamed over it: a file
        #    at a final name is never half-written, even if a download or the disk fails
        for image, path in zip(images, targets):
            data = self.storage.get(image["key"])
            part = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.part")
            try:
                with open(part, "xb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(part, path)
            except BaseException:
                part.unlink(missing_ok=True)
                raise
        return targets

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel a queued or running job (raises IllegalTransition once it has ended).

        A queued job never starts; a running one leaves its denoising loop at the next step once
        its worker hears of it (at once through the broker, or at its next heartbeat), and none
        of its images is recorded.
        """
        with self.db.session() as session:
            jobs.cancel(session, job_id)
        try:
            announce_cancel(self.settings, job_id)
        except Exception:  # only a hint: the worker's heartbeat reads the row anyway
            pass
        return self.get(job_id)

    def close(self) -> None:
        if self._publisher is not None:
            self._publisher.close()
        self.db.dispose()


def check_priority(priority: str) -> str:
    allowed = [p.value for p in Priority]
    if priority not in allowed:
        raise InvalidRequest([f"priority={priority!r}: must be one of {', '.join(allowed)}"])
    return priority
