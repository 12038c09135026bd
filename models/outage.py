"""Outages: telling an unreachable database, broker or object store from a fault of the job, and
waiting one out.

An outage never uses up a job's attempts and never fails a job: the caller waits with back-off
and carries on where it stopped when the service returns.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import Callable, TypeVar

from models.errors import ServiceUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")


def is_outage(exc: BaseException) -> bool:
    """True for errors that say a service cannot be reached right now."""
    from sqlalchemy import exc as sa_exc

    if isinstance(exc, (ServiceUnavailable, ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError)):
        return True
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return True
    try:
        import kombu.exceptions
        import redis.exceptions

        if isinstance(exc, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                            kombu.exceptions.OperationalError)):
            return True
    except ImportError:  # pragma: no cover - both come with celery[redis]
        pass
    return False


class OutageTooLong(ServiceUnavailable):
    """An outage lasted longer than the caller was willing to wait."""


def wait_out(
    action: Callable[[], T],
    what: str,
    *,
    timeout: float,
    stop: threading.Event | None = None,
    first_delay: float = 0.5,
    max_delay: float = 5.0,
) -> T:
    """Run `action`; while it fails with an outage, retry with jittered exponential back-off.

    Other errors go to the caller at once. Gives up with OutageTooLong after `timeout` seconds,
    or when `stop` is set.
    """
    deadline = time.monotonic() + timeout
    delay = first_delay
    started: float | None = None
    while True:
        try:
            result = action()
        except Exception as exc:
            if not is_outage(exc):
                raise
            now = time.monotonic()
            if started is None:
                started = now
                log.warning("%s: %s; waiting for it to come back", what, _one_line(exc))
            if now >= deadline or (stop is not None and stop.is_set()):
                raise OutageTooLong(f"{what}: still failing after {now - started:.0f} s: {_one_line(exc)}") from exc
            pause = min(delay * random.uniform(0.8, 1.2), max(0.0, deadline - now))
            if stop is not None:
                stop.wait(pause)
            else:
                time.sleep(pause)
            delay = min(delay * 2, max_delay)
            continue
        if started is not None:
            log.warning("%s: back after %.1f s", what, time.monotonic() - started)
        return result


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]
