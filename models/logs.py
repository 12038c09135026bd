"""How the long-running commands log (worker, api, webhooks, beat, sweep, run): lines of text, or
with SDQUEUE_LOG_FORMAT=json one JSON object a line, for a log shipper:

    {"time": "2025-01-31T12:00:00.123Z", "level": "INFO", "logger": "worker.engine",
     "message": "job 5f0c...: claim 1 recorded 2 image(s)", "process": "MainProcess",
     "thread": "sdqueue-cpu_0", "job_id": "5f0c...", "run": "a1b2...", "run_name": "cats-2025-01-31",
     "batch_id": "9e8d..."}

`job_id`, `run` (the run's id), `run_name` and `batch_id` are there when the line is about one: given
at the log call (`log.info(..., extra=about(job_id, run, batch_id, run_name=...))`) or by `job_context(...)` around the
code that works on a job in one thread (a contextvar: each thread sees its own). An exception's
traceback is the `exc` field. Celery's and uvicorn's own loggers, and Python's warnings, go
through the same handler.
"""

from __future__ import annotations

import io
import json
import logging
import sys
import threading
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import IO, Any, Iterator

from models.constants import GENERATE_TASK
from models.errors import ConfigError
from models.settings import Settings

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
ID_FIELDS = ("job_id", "run", "run_name", "batch_id")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

_ids: ContextVar[dict[str, str]] = ContextVar("sdqueue_log_ids", default={})  # never mutated: replaced


def about(job_id: str | None = None, run: str | None = None, batch_id: str | None = None, *,
          run_name: str | None = None) -> dict[str, str]:
    """The ids a log line is about (and its run's name), for `extra=`; those not known are left out."""
    given = {"job_id": job_id, "run": run, "run_name": run_name, "batch_id": batch_id}
    return {name: value for name, value in given.items() if value is not None}


@contextmanager
def job_context(job_id: str | None = None, run: str | None = None, batch_id: str | None = None, *,
                run_name: str | None = None) -> Iterator[None]:
    """Every line logged in this thread (or task) until the block ends is about these ids."""
    token = _ids.set({**_ids.get(), **about(job_id, run, batch_id, run_name=run_name)})
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


class LineLogger(io.TextIOBase):
    """A text stream (sys.stdout, sys.stderr) whose every complete line becomes a log record of
    `logger`: a print() or a library writing on stderr still makes JSON lines. What a handler
    writes while it logs a line (its own error report) goes to `real`, not round again."""

    def __init__(self, logger: str, level: int, real: IO[str]):
        super().__init__()
        self.logger, self.level, self.real = logging.getLogger(logger), level, real
        self._partial = threading.local()

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.real, "encoding", None) or "utf-8"

    def write(self, text: str) -> int:
        if getattr(self._partial, "busy", False):
            return self.real.write(text)
        *lines, rest = (getattr(self._partial, "text", "") + text).split("\n")
        self._partial.text = rest
        self._partial.busy = True
        try:
            for line in lines:
                if line.strip():
                    self.logger.log(self.level, line.rstrip())
        finally:
            self._partial.busy = False
        return len(text)

    def flush(self) -> None:
        pass

    def fileno(self) -> int:  # for code that asks (faulthandler, subprocesses): the real stream's
        return self.real.fileno()


def redirect_std_streams() -> None:
    """sys.stdout and sys.stderr as log lines (loggers `stdout`, `stderr`), for a process whose
    every output line must be JSON; the log handler keeps writing on the real stderr."""
    if not isinstance(sys.stdout, LineLogger):
        sys.stdout = LineLogger("stdout", logging.INFO, sys.stdout)
    if not isinstance(sys.stderr, LineLogger):
        sys.stderr = LineLogger("stderr", logging.WARNING, sys.stderr)


def make_handler(log_format: str, stream: IO[str] | None = None, text_format: str = TEXT_FORMAT) -> logging.Handler:
    if stream is None:
        stream = sys.stderr.real if isinstance(sys.stderr, LineLogger) else sys.stderr
    handler = logging.StreamHandler(stream)
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
