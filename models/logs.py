"""How the long-running commands log (worker, api, webhooks, beat, sweep, run): lines of text, or
with SDQUEUE_LOG_FORMAT=json one JSON object a line, for a log shipper:

    {"time": "2025-01-31T12:00:00.123Z", "level": "INFO", "logger": "worker.engine",
     "message": "job 5f0c...: claim 1 recorded 2 image(s)", "process": "MainProcess",
     "thread": "sdqueue-cpu_0", "job_id": "5f0c...", "run": "a1b2...", "batch_id": "9e8d..."}

`job_id`, `run` (the run's id) and `batch_id` are there when the line is about one: given at the
log call (`log.info(..., extra=about(job_id, run, batch_id))`) or by `job_context(...)` around the
code that works on a job in one thread (a contextvar: each thread sees its own). An exception's
traceback is the `exc` field. Celery's and uvicorn's own loggers, and Python's warnings, go
through the same handler.
"""

from __future__ import annotations

import json
import logging
import sys
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import IO, Any, Iterator

from models.constants import GENERATE_TASK
from models.errors import ConfigError
from models.settings import Settings

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
ID_FIELDS = ("job_id", "run", "batch_id")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

_ids: ContextVar[dict[str, str]] = ContextVar("sdqueue_log_ids", default={})  # never mutated: replaced


def about(job_id: str | None = None, run: str | None = None, batch_id: str | None = None) -> dict[str, str]:
    """The ids a log line is about, for `extra=`; those not known are left out."""
    given = {"job_id": job_id, "run": run, "batch_id": batch_id}
    return {name: value for name, value in given.items() if value is not None}


@contextmanager
def job_context(job_id: str | None = None, run: str | None = None, batch_id: str | None = None) -> Iterator[None]:
    """Every line logged in this thread (or task) until the block ends is about these ids."""
    token = _ids.set({**_ids.get(), **about(job_id, run, batch_id)})
    try:
        yield
    finally:
        _ids.reset(token)


class ContextFilter(logging.Filter):
    """Fills in the ids of the current `job_context` that a log call did not give, and the job of
    Celery's own lines about a generate task (received, succeeded, failed): its task id is the job id."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in _ids.get().items():
            if getattr(record, name, None) is None:
                setattr(record, name, value)
        task = getattr(record, "data", None)  # Celery's: the task's id and name
        if getattr(record, "job_id", None) is None and isinstance(task, dict) and task.get("name") == GENERATE_TASK:
            record.job_id = task.get("id")
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line: newlines in a message or a traceback are escaped by JSON."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.processName,
            "thread": record.threadName,
        }
        for name in ID_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = str(value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)


def level_number(level: str | int) -> int:
    """A log level by name (any case) or number; a bad one is a ConfigError naming the option."""
    if isinstance(level, int):
        return level
    if level.upper() not in LEVELS:
        raise ConfigError(f"--loglevel={level!r}: must be one of {', '.join(LEVELS)}")
    return int(logging.getLevelName(level.upper()))


def make_handler(log_format: str, stream: IO[str] | None = None, text_format: str = TEXT_FORMAT) -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(text_format))
    handler.addFilter(ContextFilter())
    return handler


def configure_logging(settings: Settings, level: str | int = "INFO", *, stream: IO[str] | None = None,
                      text_format: str = TEXT_FORMAT) -> logging.Handler | None:
    """The root logger of a long-running command: `level`, one handler on stderr (or `stream`) in
    SDQUEUE_LOG_FORMAT; that handler. Called again, it replaces the handler it installed. A root
    logger that something else configured first (a program embedding sdqueue, the test runner) is
    left as it is, as logging.basicConfig would, unless `stream` is given."""
    number = level_number(level)
    root = logging.getLogger()
    ours = [h for h in root.handlers if getattr(h, "_sdqueue", False)]
    if stream is None and len(ours) < len(root.handlers):
        return None
    for handler in ours:
        root.removeHandler(handler)
    handler = make_handler(settings.log_format, stream, text_format)
    handler._sdqueue = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(number)
    if settings.log_format == "json":
        logging.captureWarnings(True)  # Python's warnings (Celery's, say) as lines of the log, not bare text
    return handler


def json_dict_config(level: str | int = "INFO") -> dict[str, Any]:
    """The same JSON lines as a logging.config.dictConfig, for a program that configures logging in
    processes of its own (uvicorn's, `sdqueue api --workers N`): the root logger on stderr, and
    uvicorn's loggers through it."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"ids": {"()": "models.logs.ContextFilter"}},
        "formatters": {"json": {"()": "models.logs.JsonFormatter"}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr",
                                "formatter": "json", "filters": ["ids"]}},
        "root": {"handlers": ["stderr"], "level": level_number(level)},
        "loggers": {name: {"handlers": [], "propagate": True}
                    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")},
    }
