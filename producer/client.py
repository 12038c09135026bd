"""The Python client: submit a request, read a job, wait for it, fetch its images.

Order of a submit: validate everything, store the img2img input, write the job row, then send
the message. A request that fails validation leaves no trace; a message that cannot be sent
marks its job failed, so no job waits forever for a message that never left.
"""

from __future__ import annotations

import hashlib
import secrets
import time
import uuid
from pathlib import Path
from typing import Any

from celery import Celery

from models import jobs
from models.constants import GENERATE_TASK
from models.db import Database
from models.errors import ConfigError, JobTimeout, ServiceUnavailable
from models.request import GenerationRequest, parse_request
from models.settings import Settings, load_settings
from models.storage import input_key_for, open_storage
from models.tables import Job, JobState

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

    def submit(self, request: GenerationRequest | dict[str, Any]) -> str:
        """Validate, record and enqueue one job; returns its id."""
        # 1. validate (raises InvalidRequest) and check we can send at all, before any write
        if not isinstance(request, GenerationRequest):
            request = parse_request(request)
        sender = self.sender
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
                    input_key=input_key, input_sha256=input_sha256,
                )
            )
        try:
            sender.send_task(GENERATE_TASK, args=[job_id], task_id=job_id, queue=self.settings.queue)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            with self.db.session() as session:
                jobs.fail(session, job_id, f"could not be enqueued: {reason}")
            raise ServiceUnavailable(
                f"broker {self.settings.broker_url} cannot be reached ({reason}): job {job_id} was not "
                f"enqueued and is recorded as failed"
            ) from exc
        return job_id

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
        """Download the job's images into `dest` as JOBID-INDEX.png; returns the paths."""
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        paths = []
        for image in self.get(job_id)["images"]:
            path = dest / f"{job_id}-{image['index']}.png"
            path.write_bytes(self.storage.get(image["key"]))
            paths.append(path)
        return paths

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel a queued or running job (raises IllegalTransition once it has ended)."""
        with self.db.session() as session:
            jobs.cancel(session, job_id)
        return self.get(job_id)

    def close(self) -> None:
        self.db.dispose()
