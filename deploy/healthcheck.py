"""Container health checks (standard library; the project's settings for the database). Exit 0: healthy.

    python /opt/sdqueue/healthcheck.py http [URL]   GET URL (default http://127.0.0.1:8000/healthz), 2xx is healthy
    python /opt/sdqueue/healthcheck.py process NAME an `sdqueue NAME` process runs (beat, webhooks, worker)
    python /opt/sdqueue/healthcheck.py worker       an `sdqueue worker` process runs and the database answers

The worker's check is deliberately light: `celery inspect ping` goes through the broker and
wakes every worker; a dead worker process or an unreachable database is what a restart can fix.
"""

from __future__ import annotations

import os
import sys
import urllib.request


def http(url: str = "http://127.0.0.1:8000/healthz") -> bool:
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            return 200 <= response.status < 300
    except OSError:
        return False


def process(name: str) -> bool:
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        for i, arg in enumerate(argv[:-1]):
            if os.path.basename(arg) == "sdqueue" and argv[i + 1] == name:
                return True
    return False


def database() -> bool:
    from sqlalchemy import text

    from models.db import make_engine
    from models.settings import load_settings

    try:
        engine = make_engine(load_settings().database_url)
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        engine.dispose()
        return True
    except Exception:  # noqa: BLE001 - any failure is "unhealthy"
        return False


def main(argv: list[str]) -> int:
    mode = argv[0] if argv else "http"
    if mode == "http":
        ok = http(*argv[1:2])
    elif mode == "process":
        ok = process(argv[1])
    elif mode == "worker":
        ok = process("worker") and database()
    else:
        print(f"unknown check {mode!r}", file=sys.stderr)
        return 2
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
