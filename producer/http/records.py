"""The API's answers as records: frozen dataclasses (Job, Image, Run, RunCreated), each with the
JSON it was read from in `.raw`."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable

from producer.http.errors import ApiError

ENDED = frozenset({"succeeded", "failed", "cancelled"})
JOB_STATES = ("waiting", "queued", "running", "succeeded", "failed", "cancelled")


def _time(value: Any) -> datetime | None:
    return datetime.fromisoformat(value) if isinstance(value, str) else None


@dataclass(frozen=True)
class Image:
    index: int
    seed: int
    url: str  # on the API: a redirect to the object store
    sha256: str | None = None  # of the PNG file
    size_bytes: int | None = None
    width: int | None = None
    height: int | None = None
    pixel_sha256: str | None = None  # of its decoded RGB pixels: what `sdqueue reproduce` compares
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Image:
        return cls(index=data["index"], seed=data["seed"], url=data["url"], sha256=data.get("sha256"),
                   size_bytes=data.get("size_bytes"), width=data.get("width"), height=data.get("height"),
                   pixel_sha256=data.get("pixel_sha256"), raw=data)


@dataclass(frozen=True)
class Job:
    id: str
    state: str  # waiting (a follow-up), queued, running, succeeded, failed, cancelled
    params: dict[str, Any]  # the request: prompt, sizes, steps, ...
    seed: int | None
    priority: str
    mode: str = "txt2img"
    model: str | None = None
    seed_was_drawn: bool = False
    attempts: int = 0
    failures: int = 0
    dead_letter: bool = False
    error: str | None = None
    run_id: str | None = None
    run_key: str | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    images: tuple[Image, ...] = ()
    webhook: dict[str, Any] | None = None
    after: dict[str, Any] | None = None  # a follow-up: {"job": ID, "index": N}, the image it takes as input
    followers: tuple[str, ...] = ()  # the jobs that follow this one
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def ended(self) -> bool:
        return self.state in ENDED

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Job:
        return cls(
            id=data["id"], state=data["state"], params=data.get("params") or {}, seed=data.get("seed"),
            priority=data.get("priority", ""), mode=data.get("mode", "txt2img"), model=data.get("model"),
            seed_was_drawn=bool(data.get("seed_was_drawn")), attempts=data.get("attempts", 0),
            failures=data.get("failures", 0), dead_letter=bool(data.get("dead_letter")), error=data.get("error"),
            run_id=data.get("run_id"), run_key=data.get("run_key"), created_at=_time(data.get("created_at")),
            started_at=_time(data.get("started_at")), finished_at=_time(data.get("finished_at")),
            images=tuple(Image.from_json(image) for image in data.get("images") or ()), webhook=data.get("webhook"),
            after=data.get("after"), followers=tuple(data.get("followers") or ()), raw=data)


@dataclass(frozen=True)
class Run:
    name: str
    state: str  # writing (rows still being enqueued), queued, running, finished, cancelled
    priority: str
    created_at: datetime | None
    jobs: dict[str, int]  # by state, every state named
    id: str | None = None
    sealed: bool = True
    schedule: str | None = None
    expected_jobs: int | None = None
    images_done: int = 0
    images_total: int = 0
    images_per_second: float = 0.0
    eta_seconds: float | None = None  # None: no rate yet
    source_sha256: str | None = None
    defaults: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def total(self) -> int:
        return sum(self.jobs.values())

    @property
    def finished(self) -> bool:
        return self.state in ("finished", "cancelled")

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Run:
        jobs = {**dict.fromkeys(JOB_STATES, 0), **{state: int(n) for state, n in (data.get("jobs") or {}).items()}}
        return cls(name=data["name"], state=data.get("state", ""), priority=data.get("priority", ""),
                   created_at=_time(data.get("created_at")), jobs=jobs, id=data.get("id"),
                   sealed=bool(data.get("sealed", True)), schedule=data.get("schedule"),
                   expected_jobs=data.get("expected_jobs"), images_done=data.get("images_done", 0),
                   images_total=data.get("images_total", 0), images_per_second=data.get("images_per_second", 0.0),
                   eta_seconds=data.get("eta_seconds"), source_sha256=data.get("source_sha256"),
                   defaults=data.get("defaults") or {}, raw=data)


@dataclass(frozen=True)
class RunCreated:
    """The answer to create_run: the run, whether this call made it, the jobs it wrote, and the
    rows refused (with skip_invalid: the run holds the others)."""

    run: Run
    created: bool
    written: int
    rejects: list[dict[str, Any]]  # the first of them: {"line", "key", "errors"}
    reject_count: int
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunCreated:
        rejects = list(data.get("rejects") or [])
        return cls(run=Run.from_json(data["run"]), created=bool(data.get("created")), written=data.get("written", 0),
                   rejects=rejects, reject_count=data.get("reject_count", len(rejects)), raw=data)


def parsed(kind: Callable[[Any], Any], data: Any) -> Any:
    """`kind.from_json(data)`; an answer that is not one is the API's fault, said as such."""
    try:
        return kind(data)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ApiError(f"the API's answer is not what this client reads ({type(exc).__name__}: {exc}): "
                       "is SDQUEUE_API_URL an sdqueue API of this version?", body=data) from None
