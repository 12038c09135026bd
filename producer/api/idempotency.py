"""`Idempotency-Key`: the first answer to a POST is kept, and a retry of the same request with the
same key gets it again (same status, same body) and makes no job.

A key belongs to its API key (scope: the key's id, or "-" with auth off), and to one request: the
sha256 of the method, the path and the body's canonical form (JSON with sorted keys; a form's
fields, each file by its digest: a multipart boundary differs between two sends of one form). The
same key with another request is a 409.

Two requests with one key at the same time make one job: the first to insert the key's row (in a
"pending" form, status 0) runs; the primary key refuses the second its insert, and it waits for
the row to hold an answer, then gives that (or 409 with Retry-After if it takes too long). The
row is written before the work, in its own transaction, because the work (Client.submit) commits
its own: a process that dies between the two leaves a pending row, which a retry takes over
after PENDING_TAKEOVER_SECONDS, at the price of a second job if the first one was sent.

Answers kept: every 2xx and 4xx but 429. A 429 or a 5xx is transient, so its row is deleted and a
retry runs again. Rows are kept KEEP_SECONDS (24 h); an older one is taken over like a free key.
"""

from __future__ import annotations

import hashlib
import random
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

from sqlalchemy import delete, update
from sqlalchemy.exc import IntegrityError

from models.db import Database
from models.errors import InvalidRequest
from models.jobs import aware
from models.tables import IdempotentRequest, utcnow
from producer.api.errors import Answer, Conflict, answer_for

PENDING = 0
KEEP_SECONDS = 24 * 3600
PENDING_TAKEOVER_SECONDS = 120
# How long a retry waits for the answer of a first request still running.
WAIT_SECONDS = 15
MAX_KEY_CHARS = 255
# One insert in this many also deletes rows older than KEEP_SECONDS.
PRUNE_ONE_IN = 200


class KeyInUse(Conflict):
    def __init__(self, key: str):
        super().__init__(f"a request with Idempotency-Key {key!r} is still being answered: retry it later",
                         headers={"Retry-After": "1"})


@dataclass(frozen=True)
class Claim:
    """An Idempotency-Key this request holds: its answer is to be kept or given up."""

    scope: str
    key: str


def request_sha256(method: str, path: str, canonical_body: bytes) -> str:
    return hashlib.sha256(f"{method} {path}\n".encode() + canonical_body).hexdigest()


def check_key(key: str) -> str:
    """The routes declare the header's bound (FastAPI refuses it with 422); a caller of answer_once
    from elsewhere gets the same bound."""
    if not 1 <= len(key) <= MAX_KEY_CHARS or not all("!" <= c <= "~" for c in key):
        raise InvalidRequest([f"Idempotency-Key={key[:60]!r}: must be 1 to {MAX_KEY_CHARS} visible ASCII characters"])
    return key


def begin(db: Database, scope: str, key: str, digest: str) -> Claim | Answer:
    """Claim the key for this request (a Claim: do the work, then keep its answer), or the answer
    kept for it (an Answer: give it again). Conflict (409) for a key used with another request."""
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        try:
            with db.session() as session:
                session.add(IdempotentRequest(scope=scope, key=key, request_sha256=digest, status_code=PENDING,
                                              response={}, created_at=utcnow()))
            if random.randrange(PRUNE_ONE_IN) == 0:
                prune(db)
            return Claim(scope, key)
        except IntegrityError:
            pass
        with db.session() as session:
            row = session.get(IdempotentRequest, (scope, key))
            if row is None:
                continue  # given up between our insert and this read: try again
            created = aware(row.created_at)
            age = (utcnow() - created).total_seconds() if created else 0
            if age > KEEP_SECONDS or (row.status_code == PENDING and age > PENDING_TAKEOVER_SECONDS):
                session.execute(delete(IdempotentRequest).where(
                    IdempotentRequest.scope == scope, IdempotentRequest.key == key,
                    IdempotentRequest.created_at == row.created_at))
                continue
            if row.request_sha256 != digest:
                raise Conflict(f"Idempotency-Key {key!r} was used with another request (a different method, path "
                               "or body): use a new key for a new request")
            if row.status_code != PENDING:
                return Answer(row.status_code, row.response, replayed_headers(row.response))
        if time.monotonic() >= deadline:
            raise KeyInUse(key)
        time.sleep(0.05)


def keep(db: Database, claim: Claim, answer: Answer) -> None:
    """The claimed key's answer, kept (2xx, 4xx but 429) or given up (anything else)."""
    if answer.status_code < 500 and answer.status_code != 429:
        with db.session() as session:
            session.execute(update(IdempotentRequest)
                            .where(IdempotentRequest.scope == claim.scope, IdempotentRequest.key == claim.key)
                            .values(status_code=answer.status_code, response=answer.body))
    else:
        give_up(db, claim)


def give_up(db: Database, claim: Claim) -> None:
    with db.session() as session:
        session.execute(delete(IdempotentRequest).where(
            IdempotentRequest.scope == claim.scope, IdempotentRequest.key == claim.key,
            IdempotentRequest.status_code == PENDING))


def prune(db: Database) -> None:
    with db.session() as session:
        session.execute(delete(IdempotentRequest).where(
            IdempotentRequest.created_at < utcnow() - timedelta(seconds=KEEP_SECONDS)))


def replayed_headers(body: dict[str, Any]) -> dict[str, str]:
    """What a kept answer is given with again: its Location (a submit's), and a mark that it is a replay."""
    headers = {"Idempotent-Replayed": "true"}
    links = body.get("links") if isinstance(body, dict) else None
    if isinstance(links, dict) and isinstance(links.get("self"), str):
        headers["Location"] = links["self"]
    return headers


def answer_once(db: Database, scope: str, key: str | None, digest: str, work: Callable[[], Answer]) -> Answer:
    """`work`'s answer; with a key, at most one work per (scope, key, request), its answer kept.
    Blocking: run it in a worker thread."""
    if key is None:
        return work()
    claimed = begin(db, scope, check_key(key), digest)
    if isinstance(claimed, Answer):
        return claimed
    try:
        answer = work()
    except BaseException as exc:
        refusal = answer_for(exc) if isinstance(exc, Exception) else None
        if refusal is None:
            give_up(db, claimed)
            raise
        answer = refusal
    try:
        keep(db, claimed, answer)
    except Exception:
        # The work is done (a job may be queued); its answer could not be kept: the row stays pending
        # and a retry waits, then takes it over. The caller still gets this answer.
        pass
    return answer
