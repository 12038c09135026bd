"""The Python client: submit a request, read a job, wait for it, fetch its images.

Order of a submit: validate everything, store the img2img input, write the job row, then send
the message. A request that fails validation leaves no trace; when the message cannot be sent the
row and the input are taken back, so the caller's error means nothing was enqueued. A producer
killed between the row and the send leaves a queued job the sweeper sends later.
"""

from __future__ import annotations

import time
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from sqlalchemy import delete

from models import jobs
from models.broker import uses_redis
from models.cancel import cancel_job
from models.constants import BULK_SUFFIX, GENERATE_TASK, queue_for
from models.registry import model_key
from models.db import Database
from models.errors import BadDestination, ConfigError, InvalidRequest, JobTimeout, ServiceUnavailable
from models.events import Subscription
from models.request import GenerationRequest, parse_request
from models.settings import Settings, load_settings
from models.storage import INPUT_KEY_COLUMNS, open_storage
from models.tables import Job, JobState, Priority
from producer.bulk import by_queue, check_follow_ups, insert_jobs, job_row, send_batches, settle_new_follow_ups

if TYPE_CHECKING:  # Celery is imported when a message is sent: reading a job (`sdqueue status`) needs none of it
    from celery import Celery

# Client.wait reads the job's record again after this many seconds without its end's event: an
# event lost (the broker restarted, a worker could not publish) costs this much latency at most.
WAIT_BACKSTOP = 5.0


def make_sender(settings: Settings) -> Celery:
    """A Celery app that only sends messages, by task name: no worker code is imported."""
    from celery import Celery

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

    def submit(self, request: GenerationRequest | dict[str, Any], *, priority: str = Priority.INTERACTIVE.value,
               api_key_id: str | None = None, webhook_url: str | None = None,
               webhook_events: list[str] | None = None) -> str:
        """Validate, record and enqueue one job; returns its id. `webhook_events`: the ends of the
        job its webhook is POSTed for (succeeded, failed, cancelled; default all of them)."""
        # 1. validate (raises InvalidRequest) and check we can send at all, before any write
        if not isinstance(request, GenerationRequest):
            request = parse_request(request, self.settings)
        [request] = check_follow_ups(self.db, [request], self.settings)
        priority = check_priority(priority)
        webhook_events = checked_webhook_events(webhook_url, webhook_events)
        self.sender  # noqa: B018  (refuses the in-process broker before anything is written)
        # 2. the row's values: the seed resolved (a drawn seed is recorded like a given one), the
        #    img2img input in storage before the row that names it
        values = job_row(request, settings=self.settings, priority=priority, storage=self.storage,
                         api_key_id=api_key_id, webhook_url=webhook_url, webhook_events=webhook_events)
        values["enqueued_at"] = values["created_at"]
        # 3. the row (its input taken back if it cannot be written), then the message
        with self.removing_inputs_on_failure([values]), self.db.session() as session:
            session.add(Job(**values))
            released = settle_new_follow_ups(session, [values])  # a follow-up of a job that succeeded already
        try:
            for queue, job_ids in by_queue([values], {values["id"]}, released).items():
                self.send(job_ids, queue)
        except Exception as exc:
            raise ServiceUnavailable(self._unsent(exc, [values])) from exc
        return values["id"]

    def submit_many(self, requests: list[GenerationRequest | dict[str, Any]], *,
                    priority: str = Priority.INTERACTIVE.value, api_key_id: str | None = None,
                    webhook_url: str | None = None, webhook_events: list[str] | None = None) -> list[str]:
        """Validate all, then record and enqueue all in one transaction and one pipelined send;
        returns their ids in order. All or nothing: one bad request refuses the whole list
        (InvalidRequest naming each by its index), and a broker that cannot be reached takes
        every row back."""
        problems: list[str] = []
        parsed: list[GenerationRequest] = []
        for index, request in enumerate(requests):
            try:
                parsed.append(request if isinstance(request, GenerationRequest) else parse_request(request, self.settings))
            except InvalidRequest as exc:
                problems += [f"requests[{index}].{problem}" for problem in exc.problems]
        if problems:
            raise InvalidRequest(problems)
        parsed = check_follow_ups(self.db, parsed, self.settings, [f"requests[{i}]" for i in range(len(parsed))])
        priority = check_priority(priority)
        webhook_events = checked_webhook_events(webhook_url, webhook_events)
        self.sender  # noqa: B018
        values = [job_row(request, settings=self.settings, priority=priority, storage=self.storage,
                          api_key_id=api_key_id, webhook_url=webhook_url, webhook_events=webhook_events)
                  for request in parsed]
        with self.removing_inputs_on_failure(values), self.db.session() as session:
            written = insert_jobs(session, values)
            released = settle_new_follow_ups(session, values)
        try:
            send_batches(self, by_queue(values, written, released), mark=True)
        except Exception as exc:
            raise ServiceUnavailable(self._unsent(exc, values)) from exc
        return [value["id"] for value in values]

    def _unsent(self, exc: Exception, values: list[dict[str, Any]]) -> str:
        reason = f"{type(exc).__name__}: {exc}"
        return f"broker {self.settings.broker_url} cannot be reached ({reason}): {self.take_back(values)}"

    def send(self, job_ids: list[str], queue: str | None = None) -> None:
        """The jobs' messages, pipelined through one connection: one per job (the job id is the task
        id), but SDQUEUE_JOBS_PER_MESSAGE to a message on the bulk queue."""
        sender = self.sender
        queue = queue or queue_for(self.settings.queue, Priority.INTERACTIVE.value, model_key(self.settings.default_model))
        if self._publisher is None and not self.settings.in_process_broker:
            from producer.publish import BulkPublisher

            self._publisher = BulkPublisher(sender, self.settings.broker_url)
        if self._publisher is not None:
            bulk = queue.endswith(BULK_SUFFIX)
            self._publisher.send(job_ids, queue, self.settings.jobs_per_message if bulk else 1)
            return
        with sender.producer_or_acquire() as producer:
            for job_id in job_ids:
                sender.send_task(GENERATE_TASK, args=[job_id], task_id=job_id, queue=queue, producer=producer)

    @contextmanager
    def removing_inputs_on_failure(self, values: list[dict[str, Any]]) -> Iterator[None]:
        """Around the insert of rows whose inputs are stored already: if it fails, the inputs go
        too, so that no object is left that no row names."""
        try:
            yield
        except BaseException:
            self.delete_inputs([value[name] for value in values for name in INPUT_KEY_COLUMNS if value[name] is not None])
            raise

    def delete_inputs(self, keys: list[str]) -> None:
        for key in keys:
            try:
                self.storage.delete(key)
            except Exception:  # the store is away: an input no job names is harmless; the row is what counts
                pass

    def take_back(self, values: list[dict[str, Any]]) -> str:
        """Undo a submit whose messages could not be sent; says what became of the jobs."""
        ids = [value["id"] for value in values]
        try:
            with self.db.session() as session:
                session.execute(delete(Job).where(Job.id.in_(ids), Job.state == JobState.QUEUED.value))
        except Exception:
            what = f"job {ids[0]} stays" if len(ids) == 1 else f"the {len(ids)} jobs stay"
            return f"{what} recorded as queued and the sweeper sends them once the broker is back"
        self.delete_inputs([value[name] for value in values for name in INPUT_KEY_COLUMNS if value[name] is not None])
        return "nothing was enqueued"

    def get(self, job_id: str) -> dict[str, Any]:
        """The job's whole record (raises JobNotFound)."""
        with self.db.session() as session:
            return jobs.job_record(jobs.get_job(session, job_id), locate=self.storage.location)

    def wait(
        self, job_id: str, timeout: float | None = None, poll: float = 0.25,
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Block until the job ends; returns its record (raises JobTimeout).

        It sleeps until the job's events (models/events.py) announce its end, then reads the record
        again to confirm (events are hints; the row is the answer). It subscribes before the first
        read, so an end between the two is not missed, and reads the record every WAIT_BACKSTOP
        seconds anyway, so a lost event costs latency, never a hang. `on_event` gets every event:
        state changes and denoising progress. Without Redis (memory://, the demo), or once it cannot
        be reached, it reads the record every `poll` seconds instead.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        ends = {state.value for state in JobState if state.terminal}
        events: Subscription | None = None
        if uses_redis(self.settings):
            try:
                events = Subscription(self.settings, [job_id])
            except Exception:  # the broker is away: the record alone tells
                events = None
        try:
            while True:
                # 1. the record: the answer once the job has ended
                record = self.get(job_id)
                if JobState(record["state"]).terminal:
                    return record
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    raise JobTimeout(job_id, record["state"], timeout or 0)
                wake = now + (poll if events is None else WAIT_BACKSTOP)
                if deadline is not None:
                    wake = min(wake, deadline)
                if events is None:
                    time.sleep(wake - now)
                    continue
                # 2. events until one announces the end, or the backstop's read is due
                while (left := wake - time.monotonic()) > 0:
                    try:
                        event = events.get(left)
                    except Exception:  # the broker went away: poll from now on
                        with suppress(Exception):
                            events.close()
                        events = None
                        break
                    if event is None:
                        break
                    if on_event is not None:
                        on_event(event)
                    if event.get("type") == "state" and event.get("state") in ends:
                        break
        finally:
            if events is not None:
                with suppress(Exception):
                    events.close()

    def fetch(self, job_id: str, dest: Path | str, *, force: bool = False) -> list[Path]:
        """Download the job's images into the folder `dest` as JOBID-INDEX.png; returns the paths.

        Raises BadDestination, before anything is downloaded, when `dest` is not a folder that can be
        made and written to, or an image's file exists there (unless `force`: then it is written
        over). Each file is whole or absent; when a download or the disk fails (OutputFailed for
        the disk), the files and folders this call made are removed.
        """
        from producer.outputs import Outputs

        # 1. the destination: a writable folder without the files, or a refusal before anything is downloaded
        dest = Path(dest)
        out = Outputs(force=force)
        with out.all_or_nothing("the images this fetch wrote"):
            out.folder(dest)
            images = self.get(job_id)["images"]
            targets = [dest / f"{job_id}-{image['index']}.png" for image in images]
            for path in targets:
                if path.exists() and not path.is_file():
                    raise BadDestination(f"destination {str(path)!r} exists and is not a regular file")
                if path.exists() and not force:
                    raise BadDestination(f"destination {str(path)!r} exists (--force writes over it)")
            # 2. each image to a temporary file beside its final name, then renamed into place
            for image, path in zip(images, targets):
                data = self.storage.get(image["key"])
                out.write_bytes(path, data)
        return targets

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel a queued or running job (raises IllegalTransition once it has ended).

        A queued job never starts; a running one leaves its denoising loop at the next step once
        its worker hears of it (at once through the broker, or at its next heartbeat), and none
        of its images is recorded.
        """
        cancel_job(self.settings, self.db, job_id)
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


def checked_webhook_events(webhook_url: str | None, webhook_events: list[str] | None) -> list[str] | None:
    """The ends a webhook is POSTed for, checked (as the API checks them); InvalidRequest otherwise."""
    from models.webhooks import check_webhook_events

    events = check_webhook_events(webhook_events)
    if events is not None and webhook_url is None:
        raise InvalidRequest(["webhook_events is given without a webhook_url: give both, or neither"])
    return events
