"""`sdqueue webhooks`: POSTs each ended job's final record to its webhook_url, signed.

A small Celery worker (thread pool, no torch, no worker code) on the queue QUEUE.webhooks, plus a
scan thread. The database is the truth and a message only a hint: every second the scan takes
the deliveries that are due, marks them in flight and sends a message for each; one whose message
is lost is due again once its time in flight passes, and found again. GPU workers only write the
delivery row with the job's end (models.jobs.transition); they never wait on a receiver.

A try (models/webhooks.py keeps the rules and the states):
1. claim it in the database (a second message for the same try finds it claimed, and does nothing)
2. check the URL again (DNS can change) and connect to the address just checked
3. POST the record (each image with a presigned URL, valid SDQUEUE_WEBHOOK_URL_SECONDS), with
   X-Sdqueue-Signature (HMAC of the job's API key's webhook_secret; a job
   submitted without a key, which only a trusted caller can make, is not signed),
   X-Sdqueue-Delivery (to deduplicate: delivery is at least once) and X-Sdqueue-Attempt; 2.-3.
   end within SDQUEUE_WEBHOOK_TIMEOUT in all, a receiver that answers slowly included
4. record the try; a 2xx answer delivers it, 410 Gone ends it as failed, anything else (other
   4xx included: receivers misbehave for a while too, or a redirect, which is never followed) is
   tried again with back-off until SDQUEUE_WEBHOOK_RETRY_SECONDS after the job ended.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import socket
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

from models import webhooks
from models.db import Database
from models.errors import ConfigError, InvalidRequest
from models.logs import configure_logging
from models.settings import Settings
from models.tables import utcnow
from models.webhooks import Outcome, Prepared

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger("webhooks")

DELIVER_TASK = "sdqueue.deliver_webhook"
QUEUE_SUFFIX = ".webhooks"
# How often each deliverer looks for due deliveries.
SCAN_INTERVAL = 1.0
# A try in flight is not due again for SDQUEUE_WEBHOOK_TIMEOUT (the whole try ends within it) plus
# this: by then its deliverer died, or its message was lost.
IN_FLIGHT_MARGIN = 10.0
# Of an answer that is not 2xx, this much of the body is kept with the try.
ERROR_BODY_BYTES = 200
USER_AGENT = "sdqueue-webhooks"


def webhook_queue(base: str) -> str:
    return base + QUEUE_SUFFIX


class Deliverer:
    """The scan and the tries: the database work and the POSTs, messages sent through `send`."""

    def __init__(self, settings: Settings, db: Database, *, locate: Callable[[str], str] | None = None,
                 sign_url: Callable[[str], str] | None = None):
        self.settings = settings
        self.db = db
        self.locate = locate
        self.sign_url = sign_url  # an image's presigned URL, for the body (None: images in a folder)
        self.in_flight_seconds = settings.webhook_timeout + IN_FLIGHT_MARGIN

    def scan(self, send: Callable[[int, int], None]) -> int:
        """Send a message for every delivery due now; how many were sent."""
        sent = 0
        while True:
            with self.db.session() as session:
                due = webhooks.take_due(session, in_flight_seconds=self.in_flight_seconds)
            for delivery_id, attempt in due:
                send(delivery_id, attempt)
            sent += len(due)
            if len(due) < webhooks.TAKE_BATCH:
                return sent

    def deliver(self, delivery_id: int, attempt: int) -> str:
        """Make try `attempt` of the delivery; the delivery's state afterwards ("skipped": the try
        was made already, or the delivery ended)."""
        # 1. claim the try
        with self.db.session() as session:
            prepared = webhooks.start_attempt(session, delivery_id, attempt, in_flight_seconds=self.in_flight_seconds,
                                              locate=self.locate, sign_url=self.sign_url)
        if prepared is None:
            log.info("delivery %s try %s: made already, or the delivery ended", delivery_id, attempt)
            return "skipped"
        # 2.-3. check and POST, outside any transaction
        outcome = post(prepared, timeout=self.settings.webhook_timeout, allow_private=self.settings.webhook_allow_private,
                       allow=self.settings.webhook_allow_list)
        # 4. record it
        with self.db.session() as session:
            state = webhooks.finish_attempt(session, prepared, outcome, retry_seconds=self.settings.webhook_retry_seconds)
        log.info("delivery %s try %s to %s: %s (%.2f s) -> %s", delivery_id, attempt, prepared.url,
                 outcome.status_code or outcome.error, outcome.seconds, state)
        return state


def post(prepared: Prepared, *, timeout: float, allow_private: bool, allow: tuple[str, ...] = ()) -> Outcome:
    """One POST of the prepared body; what the receiver answered, or why there was no answer.

    The whole try (looking the host up, connecting, sending, and the answer to its last byte read)
    ends within `timeout` seconds: httpx's timeouts bound each read, and a receiver answering a
    byte at a time would hold a deliverer's slot for as long as it likes. Past the deadline the
    try is cancelled, its connection closed, and it counts as a failed try (the receiver's fault).
    """
    at, started = utcnow(), time.monotonic()
    status_code, error = asyncio.run(_exchange(prepared, timeout, allow_private, allow))
    return Outcome(at, status_code, error, time.monotonic() - started)


async def _exchange(prepared: Prepared, timeout: float, allow_private: bool,
                    allow: tuple[str, ...]) -> tuple[int | None, str | None]:
    try:
        async with asyncio.timeout(timeout):
            return await _post(prepared, timeout, allow_private, allow)
    except TimeoutError:
        return None, f"Timeout: no complete answer within {timeout:g} s (SDQUEUE_WEBHOOK_TIMEOUT)"


async def _post(prepared: Prepared, timeout: float, allow_private: bool,
                allow: tuple[str, ...]) -> tuple[int | None, str | None]:
    import httpx

    try:
        address = (await _addresses(prepared.url, allow_private, allow))[0]
    except InvalidRequest as exc:
        return None, "; ".join(exc.problems)
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        webhooks.DELIVERY_HEADER: str(prepared.delivery_id),
        webhooks.ATTEMPT_HEADER: str(prepared.attempt),
    }
    if prepared.secret is not None:
        headers[webhooks.SIGNATURE_HEADER] = webhooks.sign(prepared.secret, prepared.body, int(time.time()))
    try:
        url = httpx.URL(prepared.url)
        host = url.raw_host.decode("ascii")
        headers["Host"] = url.netloc.decode("ascii")  # the name, though we connect to the address checked
        # No proxy from the environment (it would reach what the URL check refused), no redirects.
        # The answer read is bounded too: h11 refuses a status line and headers over 16 KiB, and of
        # the body at most ERROR_BODY_BYTES are read (none of a 2xx).
        async with httpx.AsyncClient(timeout=timeout, trust_env=False, follow_redirects=False) as client, client.stream(
            "POST", url.copy_with(host=address), content=prepared.body, headers=headers,
            extensions={"sni_hostname": host},  # TLS still checks the certificate against the name
        ) as response:
            error = None
            if not 200 <= response.status_code < 300:
                error = f"HTTP {response.status_code} {response.reason_phrase}".strip()
                text = (await _first_bytes(response, ERROR_BODY_BYTES)).decode("utf-8", "replace").strip()
                if text:
                    error += f": {text}"
            return response.status_code, error
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        return None, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def _addresses(url: str, allow_private: bool, allow: tuple[str, ...]) -> list[str]:
    """webhooks.webhook_addresses in a thread of its own: at the deadline a resolver that has not
    answered is left behind (it gives up by itself), not waited for."""
    done: concurrent.futures.Future[list[str]] = concurrent.futures.Future()

    def resolve() -> None:
        if not done.set_running_or_notify_cancel():
            return
        try:
            done.set_result(webhooks.webhook_addresses(url, allow_private=allow_private, allow=allow))
        except BaseException as exc:
            done.set_exception(exc)

    threading.Thread(target=resolve, name="webhook-resolve", daemon=True).start()
    return await asyncio.wrap_future(done)


async def _first_bytes(response: Any, limit: int) -> bytes:
    data = b""
    try:
        async for chunk in response.aiter_bytes():
            data += chunk
            if len(data) >= limit:
                break
    except Exception:  # the body of a refusal is a courtesy: the status code is what counts
        pass
    return data[:limit]


def make_app(settings: Settings, deliverer: Deliverer | None = None) -> Celery:
    """The Celery app of the deliverer: sends `sdqueue.deliver_webhook` messages, and runs them
    when given a `deliverer`."""
    from celery import Celery

    app = Celery("sdqueue-webhooks", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        task_default_queue=webhook_queue(settings.queue),
        task_ignore_result=True,  # deliveries live in the database
        task_serializer="json",
        accept_content=["json"],
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
    )
    if deliverer is not None:

        @app.task(name=DELIVER_TASK, shared=False)
        def deliver_webhook(delivery_id: int, attempt: int) -> str:
            return deliverer.deliver(delivery_id, attempt)

    return app


def sender(app: Celery, settings: Settings) -> Callable[[int, int], None]:
    queue = webhook_queue(settings.queue)

    def send(delivery_id: int, attempt: int) -> None:
        app.send_task(DELIVER_TASK, args=[delivery_id, attempt], queue=queue)

    return send


def scan_forever(deliverer: Deliverer, send: Callable[[int, int], None], stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            deliverer.scan(send)
        except Exception as exc:  # the database or the broker is down: what is due stays due
            log.warning("webhook scan: %s: %s; trying again", type(exc).__name__, exc)
        stop.wait(SCAN_INTERVAL)


def run_webhooks(settings: Settings, *, concurrency: int = 8, loglevel: str = "INFO") -> int:
    """`sdqueue webhooks`: the scan thread and the Celery worker that makes the tries, until stopped."""
    from celery.signals import setup_logging

    configure_logging(settings, loglevel)
    setup_logging.connect(lambda **_: None, weak=False)  # Celery's lines go through our handler too
    logging.getLogger("httpx").setLevel(logging.WARNING)  # each try is logged once, by us, with its outcome
    if settings.in_process_broker:
        raise ConfigError(
            "SDQUEUE_BROKER_URL is memory:// (in-process): `sdqueue webhooks` needs a real broker, "
            "e.g. SDQUEUE_BROKER_URL=redis://127.0.0.1:6379/0"
        )
    from models.storage import open_storage

    db = Database(settings.database_url)  # refuses a schema out of date, at start
    storage = open_storage(settings.storage_url, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region)
    presign = getattr(storage, "presigned_url", None)  # S3; a folder has no URL to hand out
    deliverer = Deliverer(settings, db, locate=storage.location,
                          sign_url=(lambda key: presign(key, settings.webhook_url_seconds)) if presign else None)
    app = make_app(settings, deliverer)
    stop = threading.Event()
    scanner = threading.Thread(target=scan_forever, args=(deliverer, sender(app, settings), stop),
                               name="webhook-scan", daemon=True)
    scanner.start()
    worker = app.Worker(
        hostname=f"sdqueue-webhooks-{settings.queue}-{os.getpid()}@{socket.gethostname()}",
        pool_cls="threads",
        concurrency=concurrency,
        queues=[webhook_queue(settings.queue)],
        loglevel=loglevel,
        without_gossip=True,
        without_mingle=True,
        quiet=settings.log_format == "json",  # no banner on stdout: every line is a JSON object
    )
    try:
        worker.start()
    finally:
        stop.set()
        scanner.join(timeout=10)
        db.dispose()
    return int(worker.exitcode or 0)
