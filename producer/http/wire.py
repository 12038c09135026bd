"""What both clients send and how they read it back, in one place: a request as a `Call` (built
the same for Client and AsyncClient), when a failed call is tried again (`Retries`), and a job's
Server-Sent Events read a line at a time (`JobEvents`). Nothing here does I/O."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote

import httpx

from producer.http.errors import ApiError, Conflict, Invalid, Unavailable, retry_after
from producer.http.records import Job, parsed

# models.request.MAX_IMAGE_BYTES, not imported (that module loads Pillow); tests check they agree.
MAX_IMAGE_BYTES = 20 * 1024 * 1024
# A manifest or grid uploaded by create_run: the API's body bound decides; this only keeps a
# device or a file that never ends from being read.
MAX_MANIFEST_BYTES = 4 * 1024**3
# The event stream sends a keep-alive every 15 s: a read that waits longer means a stuck stream.
STREAM_READ_SECONDS = 20.0
POLL_SECONDS = 1.0
BACKOFF_CAP_SECONDS = 30.0

Event = dict[str, Any]


# -- requests -------------------------------------------------------------------------------------

@dataclass
class Call:
    method: str
    path: str
    params: dict[str, Any] | None = None
    json: Any = None
    data: dict[str, str] | None = None
    files: dict[str, tuple[str, bytes, str]] | None = None
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    replayable: bool = False  # a repeat cannot double anything: retried after a dropped connection

    def request(self, http: httpx.Client | httpx.AsyncClient, timeout: Any = None) -> httpx.Request:
        params = {k: v for k, v in (self.params or {}).items() if v is not None}
        extra = {} if timeout is None else {"timeout": timeout}
        return http.build_request(self.method, self.path, params=params, json=self.json, data=self.data,
                                  files=self.files, content=self.content, headers=self.headers, **extra)


def segment(value: str) -> str:
    """An id or a run's name as one path segment: `/` and `?` in it cannot reach another route."""
    return quote(str(value), safe="")


def _read_file(path: str | os.PathLike[str], bound: int, what: str) -> bytes:
    from producer.files import UnreadableFile, read_bounded

    try:
        return read_bounded(path, bound)
    except UnreadableFile as exc:
        raise Invalid(f"invalid request: {what}={str(path)!r}: {exc}", detail=[f"{what}={str(path)!r}: {exc}"]) \
            from None


def _new_key() -> str:
    """An Idempotency-Key, one per call (the same on each of its tries)."""
    import uuid  # here: it loads `platform`: a few ms that `sdqueue status` does not need

    return str(uuid.uuid4())


def _form_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def submit_call(request: dict[str, Any], *, image: bytes | str | os.PathLike[str] | None, priority: str | None,
                webhook_url: str | None, webhook_events: list[str] | None, idempotency_key: str | None,
                prefer_wait: int | None, mask: bytes | str | os.PathLike[str] | None = None,
                depth_map: bytes | str | os.PathLike[str] | None = None) -> Call:
    fields = dict(request)
    if image is None and isinstance(fields.get("image"), (bytes, bytearray, memoryview, Path)):
        image = fields.pop("image")
    if mask is None and isinstance(fields.get("mask"), (bytes, bytearray, memoryview, Path)):
        mask = fields.pop("mask")
    if depth_map is None and isinstance(fields.get("depth_map"), (bytes, bytearray, memoryview, Path)):
        depth_map = fields.pop("depth_map")
    options = {"priority": priority, "webhook_url": webhook_url, "webhook_events": webhook_events}
    body = {**fields, **{k: v for k, v in options.items() if v is not None}}
    headers = {"Idempotency-Key": idempotency_key or _new_key()}
    if prefer_wait is not None:
        headers["Prefer"] = f"wait={int(prefer_wait)}"
    if image is None and mask is None and depth_map is None:
        return Call("POST", "/v1/jobs", json=body, headers=headers, replayable=True)
    files = {name: (name, bytes(value) if isinstance(value, (bytes, bytearray, memoryview))
                    else _read_file(value, MAX_IMAGE_BYTES, name), "application/octet-stream")
             for name, value in (("image", image), ("mask", mask), ("depth_map", depth_map)) if value is not None}
    form = {name: _form_text(value) for name, value in body.items() if value is not None}
    return Call("POST", "/v1/jobs", data=form, files=files, headers=headers, replayable=True)


def batch_call(requests: list[dict[str, Any]], *, priority: str | None, webhook_url: str | None,
               webhook_events: list[str] | None, idempotency_key: str | None) -> Call:
    options = {"priority": priority, "webhook_url": webhook_url, "webhook_events": webhook_events}
    body = {"requests": list(requests), **{k: v for k, v in options.items() if v is not None}}
    return Call("POST", "/v1/jobs:batch", json=body, headers={"Idempotency-Key": idempotency_key or _new_key()},
                replayable=True)


def create_run_call(manifest: bytes | str | os.PathLike[str], *, name: str, format: str | None, skip_invalid: bool,
                    append: bool, priority: str | None, defaults: dict[str, Any] | None) -> Call:
    if isinstance(manifest, (bytes, bytearray, memoryview)):
        data, filename = bytes(manifest), "manifest"
    else:
        data, filename = _read_file(manifest, MAX_MANIFEST_BYTES, "manifest"), Path(manifest).name
    params = {"name": name, "format": format, "skip_invalid": "true" if skip_invalid else None,
              "append": "true" if append else None, "priority": priority,
              "defaults": json.dumps(defaults, separators=(",", ":")) if defaults else None}
    # the same name, source and defaults again completes the run and writes nothing twice: a
    # repeat is safe, but for an append (which adds the rows again)
    return Call("POST", "/v1/runs", params=params, files={"file": (filename, data, "application/octet-stream")},
                replayable=not append)


def export_call(name: str, *, format: str, split: str | None, to: str | None) -> Call:
    params = {"format": format, "split": split, "to": to}
    return Call("GET", f"/v1/runs/{segment(name)}/export", params=params, replayable=True)


def jobs_params(state: str | None, run: str | None, since: datetime | str | None, limit: int,
                cursor: str | None) -> dict[str, Any]:
    when = since.isoformat() if isinstance(since, datetime) else since
    return {"state": state, "run": run, "since": when, "limit": limit, "cursor": cursor}


def stream_timeout(base: httpx.Timeout, left: float | None) -> httpx.Timeout:
    """An event stream's: a read waits no longer than the keep-alive allows, nor past the deadline."""
    read = STREAM_READ_SECONDS if left is None else max(0.05, min(STREAM_READ_SECONDS, left))
    return httpx.Timeout(base.connect, read=read, write=base.write, pool=base.pool)


def download_timeout(base: httpx.Timeout) -> httpx.Timeout:
    """An export's tar stream: as long as it takes, between reads too."""
    return httpx.Timeout(base.connect, read=None, write=base.write, pool=base.pool)


# -- retries --------------------------------------------------------------------------------------

def _backoff(base: float, attempt: int, retry_after: float | None = None) -> float:
    delay = base * 2**attempt
    if retry_after is not None:
        delay = max(delay, retry_after)
    return min(delay, BACKOFF_CAP_SECONDS)


def _retryable(exc: httpx.TransportError, call: Call) -> bool:
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)):
        return True  # nothing was sent
    dropped = (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadTimeout, httpx.WriteTimeout)
    return call.replayable and isinstance(exc, dropped)


class Retries:
    """One call's tries (the rules are the package docstring's): each method answers the seconds
    to wait before the next try, or None when the failure is to be raised."""

    def __init__(self, call: Call, retries: int, backoff: float):
        self.call, self.retries, self.backoff = call, retries, backoff
        self.attempt = 0

    def after_failure(self, exc: httpx.TransportError) -> float | None:
        """No answer came: the connection could not be made, or dropped."""
        if self.attempt < self.retries and _retryable(exc, self.call):
            return self._next(_backoff(self.backoff, self.attempt))
        return None

    def after_refusal(self, response: httpx.Response, error: ApiError) -> float | None:
        """An error answer: a 503, or a submit's Idempotency-Key still being answered."""
        busy_key = isinstance(error, Conflict) and self.call.replayable and "retry-after" in response.headers
        if self.attempt < self.retries and (isinstance(error, Unavailable) or busy_key):
            return self._next(_backoff(self.backoff, self.attempt, retry_after(error.headers)))
        return None

    def _next(self, delay: float) -> float:
        self.attempt += 1
        return delay


# -- Server-Sent Events ---------------------------------------------------------------------------

class Frames:
    """Server-Sent Events, fed a line at a time: `feed` gives (event, data) at each frame's end,
    data read as JSON (ValueError when it is not); comments (keep-alives) are skipped."""

    def __init__(self) -> None:
        self.event, self.data = "", []  # type: tuple[str, list[str]]

    def feed(self, line: str) -> tuple[str, Any] | None:
        if line == "":
            frame = None
            if self.event or self.data:
                frame = (self.event or "message", json.loads("\n".join(self.data)) if self.data else None)
            self.event, self.data = "", []
            return frame
        if line.startswith("event:"):
            self.event = line[6:].strip()
        elif line.startswith("data:"):
            self.data.append(line[5:].lstrip())
        return None


def _event(name: str, data: Any) -> Event | None:
    """An SSE frame as the event `on_event` gets (the local Client.wait's shape)."""
    if name in ("state", "end"):
        job = parsed(Job.from_json, data)
        return {"type": "state", "state": job.state, "job": job}
    if name == "progress" and isinstance(data, dict):
        return {"type": "progress", "step": data.get("step"), "steps": data.get("steps")}
    return None


class JobEvents:
    """A job's event stream, fed a line at a time: each event goes to `on_event` (a state once,
    however often it is sent); `feed` names each frame as it ends, and after the "end" frame `job`
    is the job's final record. ValueError for a frame that is not JSON."""

    def __init__(self, on_event: Callable[[Event], None] | None):
        self.on_event = on_event
        self.frames = Frames()
        self.last: str | None = None
        self.job: Job | None = None

    def feed(self, line: str) -> str | None:
        if (frame := self.frames.feed(line)) is None:
            return None
        name, data = frame
        event = _event(name, data)
        if event is not None and self.on_event is not None and (event["type"] != "state" or event["state"] != self.last):
            self.on_event(event)
            self.last = event.get("state", self.last)
        if name == "end":
            self.job = event["job"] if event else None
        return name


def fallback(on_event: Callable[[Event], None] | None, reason: Any) -> None:
    """The stream is refused or broke: say so to `on_event`, and wait by polling."""
    if on_event is not None:
        on_event({"type": "polling", "reason": str(reason)})
    return None
