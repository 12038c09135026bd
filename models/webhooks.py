"""Webhooks: the signature of a POST, the rules a webhook URL must pass, and the state of a delivery.

A job with a webhook_url gets a WebhookDelivery row when it ends, in the transaction that ends it
(models.jobs.transition). `sdqueue webhooks` (producer/webhooks.py) takes due rows, POSTs the job's
final record and records each try here:

    pending -> delivered             a 2xx answer
            -> pending (back-off)    any other answer or no answer: again after 1 s, 2 s, 4 s, ... 10 min
            -> failed                410 Gone, or SDQUEUE_WEBHOOK_RETRY_SECONDS after the job ended

Delivery is at least once: a receiver deduplicates by the X-Sdqueue-Delivery header. Each try has
a number (`attempt`); a message names the try it is for, and only the first message for a try
makes it, so a message sent twice, or by two scanners, does not POST twice.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Callable, Iterable
from urllib.parse import urlsplit

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from models.errors import InvalidRequest
from models.jobs import aware, job_record
from models.tables import ApiKey, Job, JobState, WebhookAttempt, WebhookDelivery, utcnow

SIGNATURE_HEADER = "X-Sdqueue-Signature"
DELIVERY_HEADER = "X-Sdqueue-Delivery"
ATTEMPT_HEADER = "X-Sdqueue-Attempt"

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"

MAX_URL_LENGTH = 2048
# Back-off after failed try n: 2**(n-1) seconds, at most this.
MAX_BACKOFF = 600.0
# The receiver asks us to stop: no more tries.
GONE = 410
# Deliveries taken per transaction of a scan.
TAKE_BATCH = 100
# The ends of a job a webhook may be asked for (`webhook_events`); every one unless it says.
EVENTS = tuple(state.value for state in JobState if state.terminal)


# 1. signatures (Stripe's scheme): t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>." + body>


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The X-Sdqueue-Signature value of `body` sent at `timestamp` (unix seconds)."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify(secret: str, body: bytes, header: str, *, tolerance: float = 300, now: float | None = None) -> bool:
    """Whether `header` signs exactly `body` under `secret`, at a time within `tolerance` seconds of
    `now` (a captured request replayed later is refused). What a receiver runs."""
    timestamp: int | None = None
    candidates: list[bytes] = []
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        if name == "t" and value.isascii() and value.isdigit():
            timestamp = int(value)
        elif name == "v1":
            candidates.append(value.encode())
    if timestamp is None or not candidates:
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance:
        return False
    expected = sign(secret, body, timestamp).partition(",v1=")[2].encode()
    # Every candidate compared, in constant time each: several v1 values let a secret be rotated.
    return any([hmac.compare_digest(expected, candidate) for candidate in candidates])


# 2. URL rules: checked when a job is submitted and again before each POST (DNS can change)


def check_webhook_url(url: str, *, allow_private: bool, allow: Iterable[str] = ()) -> str:
    """The URL, if a webhook may be POSTed there: http or https, a host, at most 2048 characters, and
    a host that resolves only to public addresses, unless `allow_private` (any address) or the host
    or each address it resolves to is in `allow` (SDQUEUE_WEBHOOK_ALLOW: networks and host names).
    Raises InvalidRequest."""
    webhook_addresses(url, allow_private=allow_private, allow=allow)
    return url


def check_webhook_events(value: Any) -> list[str] | None:
    """The ends a webhook is POSTed for: a list of EVENTS (or, from a form, one text of them
    comma-separated), in EVENTS' order; None (every end) when not given. Raises InvalidRequest."""
    if value is None:
        return None
    names = value.split(",") if isinstance(value, str) else value
    if not isinstance(names, list) or not names or not all(isinstance(name, str) for name in names):
        raise InvalidRequest([f"webhook_events={repr(value)[:60]}: must be a list of one or more of "
                              f"{', '.join(EVENTS)}"])
    unknown = [name for name in names if name.strip() not in EVENTS]
    if unknown:
        raise InvalidRequest([f"webhook_events={repr(value)[:60]}: {repr(unknown[0])[:40]} is not one of "
                              f"{', '.join(EVENTS)}"])
    wanted = {name.strip() for name in names}
    return [event for event in EVENTS if event in wanted]


def allowed(host: str, address: str, allow: Iterable[str]) -> bool:
    """Whether SDQUEUE_WEBHOOK_ALLOW's entries let a webhook reach `address`, which `host` resolved
    to: an entry naming the host (exactly, case aside), or a network holding the address."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    name = host.rstrip(".").lower()
    for entry in allow:
        try:
            if ip in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:  # a host name
            if entry.rstrip(".").lower() == name:
                return True
        except TypeError:  # a network of the other IP version
            pass
    return False


def webhook_addresses(url: str, *, allow_private: bool, allow: Iterable[str] = ()) -> list[str]:
    """The addresses the URL's host resolves to, all of them allowed (raises InvalidRequest). The
    deliverer connects to the first one, so that a name resolving elsewhere by the time of the
    POST (DNS rebinding) cannot lead it to an address that was not checked."""
    where = f"webhook_url={url!r}"
    if not isinstance(url, str) or not url:
        raise InvalidRequest([f"{where}: must be an http:// or https:// URL"])
    if len(url) > MAX_URL_LENGTH:
        raise InvalidRequest([f"webhook_url={url[:40]!r}... of {len(url)} characters: at most {MAX_URL_LENGTH}"])
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InvalidRequest([f"{where}: not a URL ({exc})"]) from None
    if parts.scheme.lower() not in ("http", "https"):
        raise InvalidRequest([f"{where}: scheme must be http or https"])
    host = parts.hostname
    if not host:
        raise InvalidRequest([f"{where}: has no host"])
    try:
        infos = socket.getaddrinfo(host, port or (443 if parts.scheme.lower() == "https" else 80),
                                   type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise InvalidRequest([f"{where}: host {host!r} does not resolve ({exc})"]) from None
    addresses = list(dict.fromkeys(str(info[4][0]).partition("%")[0] for info in infos))
    if not addresses:
        raise InvalidRequest([f"{where}: host {host!r} does not resolve"])
    if not allow_private:
        allow = tuple(allow)
        for address in addresses:
            kind = _not_public(address)
            if kind and not allowed(host, address, allow):
                raise InvalidRequest([f"{where}: resolves to {address}, {kind}; add it (or its host or network) to "
                                      "SDQUEUE_WEBHOOK_ALLOW, or set SDQUEUE_WEBHOOK_ALLOW_PRIVATE=true to allow it"])
    return addresses


def _not_public(address: str) -> str | None:
    """What kind of address it is, when it is not one a webhook may reach from here."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    for test, kind in ((ip.is_unspecified, "an unspecified address"), (ip.is_loopback, "a loopback address"),
                       (ip.is_link_local, "a link-local address"), (ip.is_multicast, "a multicast address"),
                       (ip.is_reserved, "a reserved address"), (ip.is_private, "a private address"),
                       (not ip.is_global, "not a public address")):
        if test:
            return kind
    return None


# 3. deliveries: each function works in the caller's transaction


def backoff(attempt: int) -> float:
    """Seconds between failed try `attempt` (1, 2, ...) and the next: 1, 2, 4, ... at most 10 minutes."""
    return min(2.0 ** (attempt - 1), MAX_BACKOFF)


def take_due(session: Session, *, in_flight_seconds: float, limit: int = TAKE_BATCH) -> list[tuple[int, int]]:
    """Pending deliveries due now, marked in flight (not due again for `in_flight_seconds`, so that
    another scan does not send them too); (delivery id, the try to make) for each message to send.

    Rows are taken with FOR UPDATE SKIP LOCKED on PostgreSQL (a plain transaction on SQLite, whose
    writers take turns): several scanners at once each take their own.
    """
    now = utcnow()
    due = session.execute(
        select(WebhookDelivery.id, WebhookDelivery.attempts)
        .where(WebhookDelivery.state == PENDING, WebhookDelivery.next_attempt_at <= now)
        .order_by(WebhookDelivery.next_attempt_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    if due:
        session.execute(update(WebhookDelivery).where(WebhookDelivery.id.in_([row.id for row in due]))
                        .values(next_attempt_at=now + timedelta(seconds=in_flight_seconds)))
    return [(row.id, row.attempts + 1) for row in due]


@dataclass(frozen=True)
class Prepared:
    """A try about to be made: where, what (the exact bytes signed), and with which secret."""

    delivery_id: int
    attempt: int
    url: str
    body: bytes
    secret: str | None  # None: the job has no API key, and its POSTs are not signed


@dataclass(frozen=True)
class Outcome:
    """How a try went: the receiver's status code, or why there was none."""

    at: datetime
    status_code: int | None
    error: str | None
    seconds: float

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def start_attempt(session: Session, delivery_id: int, attempt: int, *, in_flight_seconds: float,
                  locate: Callable[[str], str] | None = None, sign_url: Callable[[str], str] | None = None
                  ) -> Prepared | None:
    """Claim try `attempt` of the delivery; None when it was claimed already (a message sent twice)
    or the delivery ended. The claim keeps it in flight for `in_flight_seconds`."""
    delivery = session.scalars(
        select(WebhookDelivery).where(WebhookDelivery.id == delivery_id).with_for_update()
    ).one_or_none()
    if delivery is None or delivery.state != PENDING or delivery.attempts != attempt - 1:
        return None
    delivery.attempts = attempt
    delivery.next_attempt_at = utcnow() + timedelta(seconds=in_flight_seconds)
    job = session.get(Job, delivery.job_id)
    assert job is not None  # the delivery goes with its job (ON DELETE CASCADE)
    key = session.get(ApiKey, job.api_key_id) if job.api_key_id else None
    return Prepared(delivery.id, attempt, delivery.url, body_of(job, locate=locate, sign_url=sign_url),
                    key.webhook_secret if key else None)


def body_of(job: Job, *, locate: Callable[[str], str] | None = None,
            sign_url: Callable[[str], str] | None = None) -> bytes:
    """The bytes POSTed: the job's final record as compact JSON with sorted keys, each image with a
    `url` the receiver can GET it from (`sign_url`: a presigned URL of the object store; null
    without one, images kept in a folder). The record's own "webhook" field (this delivery's
    progress) is left out, so every try sends the same body but for those URLs, signed anew for
    each try: a retry an hour later still carries URLs that work."""
    record: dict[str, Any] = job_record(job, locate=locate)
    record.pop("webhook", None)
    for image in record["images"]:
        image["url"] = sign_url(image["key"]) if sign_url is not None else None
    return json.dumps(record, sort_keys=True, separators=(",", ":")).encode()


def finish_attempt(session: Session, prepared: Prepared, outcome: Outcome, *, retry_seconds: float) -> str:
    """Record the try and move the delivery on; returns its state afterwards."""
    delivery = session.scalars(
        select(WebhookDelivery).where(WebhookDelivery.id == prepared.delivery_id).with_for_update()
    ).one_or_none()
    if delivery is None:
        return "gone"  # its job was deleted meanwhile
    session.add(WebhookAttempt(delivery_id=delivery.id, at=outcome.at, status_code=outcome.status_code,
                               error=outcome.error, seconds=outcome.seconds))
    if delivery.state != PENDING:
        return delivery.state
    now = utcnow()
    if outcome.delivered:
        delivery.state, delivery.finished_at = DELIVERED, now
    elif delivery.attempts != prepared.attempt:
        pass  # a later try started while this one hung past its time in flight: that one decides
    elif outcome.status_code == GONE or (now - (aware(delivery.created_at) or now)).total_seconds() >= retry_seconds:
        delivery.state, delivery.finished_at = FAILED, now
    else:
        delivery.next_attempt_at = now + timedelta(seconds=backoff(prepared.attempt))
    return delivery.state

