"""API keys: made, listed and revoked by `sdqueue keys`; found by their token's sha256.

A token is `sdq_` and 32 random bytes (URL-safe base64), shown once when its key is made; the
database keeps its sha256 only, and its first characters to tell keys apart in a listing. Each key
also gets the secret its jobs' webhooks are signed with (stored as is: the signer needs it).
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from models.db import Database
from models.errors import SdqueueError
from models.tables import ApiKey, utcnow
from models.text import refused_character

TOKEN_PREFIX = "sdq_"
WEBHOOK_SECRET_PREFIX = "whsec_"
# How much of a token a listing shows: "sdq_" and 8 characters, too few to guess the rest by.
SHOWN_CHARS = 12
MAX_NAME_CHARS = 255
# What the rate_per_minute and max_queued columns (Integer) hold.
MAX_BOUND = 2**31 - 1


class KeyNotFound(SdqueueError, LookupError):
    def __init__(self, name: str):
        self.name = name
        super().__init__(f"no API key named {name!r} (`sdqueue keys list` shows them)")


class BadKeyOption(SdqueueError, ValueError):
    """A key name or bound `sdqueue keys create` refuses. Nothing was made."""


class KeyExists(SdqueueError, ValueError):
    def __init__(self, name: str):
        super().__init__(f"an API key named {name!r} exists already (names are never reused, even once revoked)")


@dataclass(frozen=True)
class NewKey:
    """A key just made: the only time its token is known."""

    key: ApiKey
    token: str


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def create_key(db: Database, name: str, *, rate_per_minute: int | None = None, max_queued: int | None = None,
               bulk_only: bool = False, admin: bool = False) -> NewKey:
    """Make a key; KeyExists when the name is taken, BadKeyOption for a bad name or bound."""
    refused = refused_character(name, allow_newlines=False)
    if refused is not None:
        raise BadKeyOption(f"key name {name!r}: must not hold control characters: {refused}")
    if not name.strip() or len(name) > MAX_NAME_CHARS or not name.isprintable():
        raise BadKeyOption(f"key name {name!r}: must be 1 to {MAX_NAME_CHARS} printable characters")
    for option, value in (("--rate", rate_per_minute), ("--max-queued", max_queued)):
        if value is not None and not 1 <= value <= MAX_BOUND:
            raise BadKeyOption(f"{option}={value}: must be from 1 to {MAX_BOUND}")
    token = new_token()
    key = ApiKey(id=str(uuid.uuid4()), name=name, token_sha256=token_sha256(token), token_prefix=token[:SHOWN_CHARS],
                 webhook_secret=WEBHOOK_SECRET_PREFIX + secrets.token_urlsafe(32), rate_per_minute=rate_per_minute,
                 max_queued=max_queued, bulk_only=bulk_only, admin=admin, created_at=utcnow())
    try:
        with db.session() as session:
            session.add(key)
    except IntegrityError:
        raise KeyExists(name) from None
    return NewKey(key, token)


def list_keys(db: Database) -> list[ApiKey]:
    with db.session() as session:
        return list(session.scalars(select(ApiKey).order_by(ApiKey.created_at, ApiKey.name)))


def revoke_key(db: Database, name: str) -> ApiKey:
    """Revoke the key named `name` (at once: the next request with its token gets 401). Revoking a
    revoked key changes nothing."""
    with db.session() as session:
        key = session.scalars(select(ApiKey).where(ApiKey.name == name).with_for_update()).one_or_none()
        if key is None:
            raise KeyNotFound(name)
        if key.revoked_at is None:
            key.revoked_at = utcnow()
        return key


def find_key(db: Database, token: str) -> ApiKey | None:
    """The key whose token this is, revoked or not; None when there is none."""
    with db.session() as session:
        return session.scalars(select(ApiKey).where(ApiKey.token_sha256 == token_sha256(token))).one_or_none()
