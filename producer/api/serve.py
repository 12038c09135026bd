"""`sdqueue api`: the app under uvicorn.

With one worker the app is made here, from the settings the command read; with several, uvicorn
starts processes that each make their own from the environment (the same SDQUEUE_* variables).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import Iterator

from models.errors import ConfigError, ServiceUnavailable
from models.logs import configure_logging, json_dict_config
from models.settings import Settings

log = logging.getLogger("sdqueue.api")

AUTH_OFF_WARNING = (
    "SDQUEUE_API_AUTH=off: the API takes no keys. ANYONE WHO CAN REACH {where} CAN SUBMIT JOBS, AND READ AND "
    "CANCEL EVERY JOB AND IMAGE. Run it so only on a network you trust; `sdqueue keys create` makes keys."
)


def run_api(settings: Settings, *, host: str, port: int, workers: int = 1, log_level: str = "info") -> int:
    import uvicorn

    # 1. refuse what cannot work before listening
    if settings.in_process_broker:
        raise ConfigError("SDQUEUE_BROKER_URL is memory:// (the in-process broker of `sdqueue demo`): no worker "
                          "would see the API's jobs. Set SDQUEUE_BROKER_URL=redis://HOST:6379/0")
    if workers < 1:
        raise ConfigError(f"--workers={workers}: must be at least 1")
    configure_logging(settings, log_level)
    # 2. say loudly what auth off means, and whether the database is there (it may come later)
    if settings.api_auth == "off":
        log.warning(AUTH_OFF_WARNING.format(where=f"{host}:{port}"))
    _check_database(settings)
    # 3. serve
    common = {"host": host, "port": port, "log_level": log_level, "ws": "none", "lifespan": "on",
              "timeout_graceful_shutdown": 10}
    if settings.log_format == "json":  # uvicorn's loggers through the root's JSON handler, in each process
        common["log_config"] = json_dict_config(log_level)
    if workers == 1:
        from producer.api.app import create_app

        uvicorn.run(create_app(settings), **common)  # type: ignore[arg-type]
    else:
        with _shared_metrics():
            uvicorn.run("producer.api.app:create_app_from_environment", factory=True, workers=workers,
                        **common)  # type: ignore[arg-type]
    return 0


@contextmanager
def _shared_metrics() -> Iterator[None]:
    """Worker processes count their requests in files of one folder, which /metrics sums
    (prometheus_client's multiprocess mode); a folder given in PROMETHEUS_MULTIPROC_DIR is kept."""
    from producer.api.metrics import MULTIPROCESS_ENV

    if os.environ.get(MULTIPROCESS_ENV):
        yield
        return
    folder = tempfile.mkdtemp(prefix="sdqueue-api-metrics-")
    os.environ[MULTIPROCESS_ENV] = folder
    try:
        yield
    finally:
        del os.environ[MULTIPROCESS_ENV]
        shutil.rmtree(folder, ignore_errors=True)


def _check_database(settings: Settings) -> None:
    """A database at another schema is a mistake to fix first; one that does not answer yet only
    makes the API unready until it does."""
    from models.db import Database

    try:
        Database(settings.database_url).dispose()
    except ServiceUnavailable as exc:
        log.warning("%s: the API answers 503 until it can be reached", exc)
