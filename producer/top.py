"""`sdqueue top`: the deployment at a glance, as plain text that any terminal (and SSH) shows.

One frame is a snapshot of four sources, each read on its own so that one that does not answer
costs its section only: the workers' live statuses (models/workers.py), the depth of the
interactive and bulk queues (Redis), the jobs by state (the database, every queue, as /metrics
counts them) and the runs not finished. On a terminal the frame is redrawn in place every
`interval` seconds, on the alternate screen as `top` does; otherwise (a pipe, `--once`) it is
printed once. A worker that takes no work says why under its name: quarantined (a fault of its
host: the reason, and when it probes itself again), or its spool's disk full.
"""

from __future__ import annotations

import shutil
import sys
import time
from datetime import datetime, timezone
from typing import Any, Callable, TextIO

from sqlalchemy import func, select

from models.broker import model_queue_depths, redis_client, uses_redis
from models.jobs import aware, queued_by_model
from models.settings import Settings
from models.tables import STATES, Job, JobState
from models.text import inert
from models.workers import list_workers
from producer.client import Client

# Runs shown at most (the newest first), and how many of the newest runs are looked at.
MAX_RUNS, RECENT_RUNS = 8, 100
# A running job's progress bar, in characters.
BAR = 10


def snapshot(client: Client) -> dict[str, Any]:
    """What one frame shows, as data (`sdqueue top --json` prints it)."""
    settings = client.settings
    frame: dict[str, Any] = {"at": time.time(), "queue": settings.queue, "errors": {}}
    sources: list[tuple[str, Callable[[], Any]]] = [
        ("workers", lambda: _workers(settings)),
        ("queues", lambda: _queue_depths(client)),
        ("jobs", lambda: _jobs_by_state(client)),
        ("runs", lambda: _runs_in_progress(client)),
    ]
    for name, read in sources:
        try:
            frame[name] = read()
        except Exception as exc:  # a source away is shown as such; the others still are
            frame[name] = None
            frame["errors"][name] = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
    return frame


def _workers(settings: Settings) -> list[dict[str, Any]]:
    """The registry's statuses, each with `quarantined` and `spool` (None: not quarantined; no
    spool, or a worker too old to say)."""
    return [{"quarantined": None, "spool": None} | status for status in list_workers(settings)]


def _queue_depths(client: Client) -> dict[str, int] | None:
    if not uses_redis(client.settings):
        return None  # the in-process broker: nothing outside the process can see it
    redis = redis_client(client.settings)
    try:
        return {queue["name"]: queue["depth"] for queue in model_queue_depths(redis, client.settings)}
    finally:
        redis.close()


def _jobs_by_state(client: Client) -> dict[str, Any]:
    with client.db.session() as session:
        rows = session.execute(select(Job.state, func.count(), func.min(Job.created_at)).group_by(Job.state)).all()
        by_model = queued_by_model(session)
    counts = dict.fromkeys(STATES, 0) | {state: count for state, count, _ in rows}
    oldest = next((aware(first) for state, _, first in rows if state == JobState.QUEUED.value), None)
    return {"counts": counts, "oldest_queued_s": None if oldest is None else
            max(0.0, (datetime.now(timezone.utc) - oldest).total_seconds()), "queued_by_model": by_model}


def _runs_in_progress(client: Client) -> list[dict[str, Any]]:
    from producer.runs import status

    runs = [run for run in status.list_runs(client, limit=RECENT_RUNS) if not run.finished][:MAX_RUNS]
    return [status.run_status(client, run.name).as_dict() for run in runs]


# --- one frame as text -----------------------------------------------------------------------------


def render(frame: dict[str, Any], width: int = 100) -> list[str]:
    """The frame's lines, none wider than `width`."""
    at = datetime.fromtimestamp(frame["at"]).strftime("%Y-%m-%d %H:%M:%S")
    lines = [f"sdqueue top - queue {frame['queue']} - {at}", ""]
    lines += _workers_section(frame)
    lines += [""] + _queues_section(frame)
    lines += [""] + _runs_section(frame)
    # Statuses and run names are other processes' and users' words: none may act on the terminal.
    return [inert(line)[:width] for line in lines]


def _unavailable(frame: dict[str, Any], source: str) -> list[str]:
    return [f"  unavailable: {frame['errors'][source]}"] if source in frame["errors"] else []


def _workers_section(frame: dict[str, Any]) -> list[str]:
    workers = frame["workers"]
    if workers is None:
        return ["WORKERS"] + _unavailable(frame, "workers")
    rate = sum(w.get("images_per_s") or 0.0 for w in workers)
    quarantined = sum(1 for w in workers if w.get("quarantined"))
    disk_full = sum(1 for w in workers if (w.get("spool") or {}).get("disk_full"))
    out = []  # workers that take no work, or start no batch
    if quarantined:
        out.append(f"{quarantined} QUARANTINED")
    if disk_full:
        out.append(f"{disk_full} spool disk full")
    lines = [f"WORKERS {len(workers)}{' (' + ', '.join(out) + ')' if out else ''}   {rate:.2f} images/s"]
    if not workers:
        return lines + ["  none (a worker publishes its status every SDQUEUE_STATUS_INTERVAL seconds)"]
    for w in workers:
        states = []
        if w.get("draining"):
            states.append("draining")
        if w.get("quarantined"):
            states.append("quarantined")
        state = ", ".join(states) or "serving"
        age = frame["at"] - w.get("updated_at", frame["at"])
        if age > 10:
            state += f", last seen {_duration(age)} ago"
        up = _duration(max(0.0, frame["at"] - w.get("started_at", frame["at"])))
        lines.append(f"  {w.get('name')}  (host {w.get('host')}, pid {w.get('pid')})  {state}, up {up}")
        lines += _trouble(w, frame["at"])
        lines.append(f"    {w.get('model')} on {w.get('device')} {w.get('dtype')} ({w.get('batching')})  "
                     f"held {w.get('held', 0)}  waiting {w.get('waiting', 0)}  done {w.get('images_done', 0)}  "
                     f"{w.get('images_per_s', 0.0):.2f} images/s")
        running = w.get("running", [])
        for index, loop in enumerate(w.get("loops", [])):
            lines.append(f"    loop {loop['size']}: {loop['jobs']} job(s), {loop['samples']} sample(s)")
            for job in running:
                if job.get("loop") == index:
                    lines.append(f"      {job['job_id']}  x{job.get('images', 1)}  "
                                 f"{_progress(job.get('step'), job.get('steps'))}")
        if not running:
            lines.append("    idle" if not w.get("held") else "    nothing denoising")
    return lines


def _trouble(w: dict[str, Any], at: float) -> list[str]:
    """Why a worker takes no work, and its spool: the lines under its name (none when all is well).
    The probe comes before the reason, which is long, so that a narrow terminal still shows it."""
    lines = []
    quarantine = w.get("quarantined")
    if isinstance(quarantine, dict):
        since, next_probe = quarantine.get("since"), quarantine.get("next_probe")
        held = f" {_duration(max(0.0, at - since))}" if isinstance(since, (int, float)) else ""
        probe = f"probe {int(quarantine.get('probes') or 0) + 1}"
        if isinstance(next_probe, (int, float)):
            probe += f" in {_duration(next_probe - at)}" if next_probe > at else " due now"
        reason = " ".join(str(quarantine.get("reason") or "no reason given").split())
        lines.append(f"    QUARANTINED{held} ({probe}): {reason}")
    spool = w.get("spool")
    if isinstance(spool, dict):
        spooled, most = spool.get("bytes") or 0, spool.get("max_bytes")
        held_bytes = f"{_bytes(spooled)} spooled" + (f" of {_bytes(most)}" if most else "")
        if spool.get("disk_full"):
            free = spool.get("free_bytes")
            lines.append(f"    spool disk full (free {'unknown' if free is None else _bytes(free)}): "
                         f"no new batch starts; {held_bytes}")
        elif most and spooled >= most:
            lines.append(f"    spool full: no new batch starts; {held_bytes} for the object store")
        elif spooled:
            lines.append(f"    {held_bytes} for the object store")
    return lines


def _bytes(count: float) -> str:
    """Decimal units, as the spool logs them: 512 B, 12 MB, 3.5 GB."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.{0 if count >= 10 * size else 1}f} {unit}"
    return f"{int(count)} B"


def _progress(step: int | None, steps: int | None) -> str:
    if not steps:
        return ""
    if step is None:
        return f"{steps} steps"
    filled = round(BAR * min(step, steps) / steps)
    return f"[{'#' * filled}{'.' * (BAR - filled)}] step {step}/{steps}"


def _queues_section(frame: dict[str, Any]) -> list[str]:
    lines = ["QUEUES (messages waiting)"]
    if frame["queues"] is None:
        lines += _unavailable(frame, "queues") or ["  in-process broker (memory://): not visible from here"]
    else:
        lines += [f"  {queue:40} {depth:>8}" for queue, depth in frame["queues"].items()]
    lines.append("")
    jobs = frame["jobs"]
    if jobs is None:
        return lines + ["JOBS"] + _unavailable(frame, "jobs")
    # follow-ups waiting for their parent: shown where there are any
    counts = "  ".join(f"{state} {count}" for state, count in jobs["counts"].items() if state != "waiting" or count)
    oldest = jobs["oldest_queued_s"]
    waited = f"   (oldest queued: {_duration(oldest)})" if oldest is not None else ""
    lines.append(f"JOBS  {counts}{waited}")
    if jobs.get("queued_by_model"):
        lines.append("  queued by model: " + ", ".join(f"{model} {count}" for model, count in jobs["queued_by_model"].items()))
    return lines


def _runs_section(frame: dict[str, Any]) -> list[str]:
    runs = frame["runs"]
    if runs is None:
        return ["RUNS IN PROGRESS"] + _unavailable(frame, "runs")
    if not runs:
        return ["RUNS IN PROGRESS  none"]
    lines = ["RUNS IN PROGRESS", f"  {'RUN':32} {'ENDED':>13} {'QUEUED':>7} {'RUNNING':>7} {'FAILED':>6} "
             f"{'IMG/S':>7} {'ETA':>8}"]
    for run in runs:
        jobs = run["jobs"]
        ended = jobs["succeeded"] + jobs["failed"] + jobs["cancelled"]
        eta = run["eta_seconds"]
        done = f"{ended}/{run['total']}"
        lines.append(f"  {run['name']:32} {done:>13} {jobs['queued']:>7} {jobs['running']:>7} "
                     f"{jobs['failed']:>6} {run['images_per_second']:>7.2f} "
                     f"{'-' if eta is None else _duration(eta):>8}")
    return lines


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


# --- on a terminal -----------------------------------------------------------------------------------

# The alternate screen (left as it was found on exit), the cursor hidden while it shows.
ENTER, LEAVE = "\x1b[?1049h\x1b[?25l", "\x1b[?25h\x1b[?1049l"
HOME, CLEAR_LINE, CLEAR_BELOW = "\x1b[H", "\x1b[K", "\x1b[J"


def watch(client: Client, interval: float, out: TextIO = sys.stdout, frames: int | None = None) -> None:
    """Redraw the frame in place every `interval` seconds until Ctrl-C (or `frames` frames).
    Each line overwrites the last frame's and clears what is left of it: no flicker over SSH."""
    out.write(ENTER)
    try:
        shown = 0
        while frames is None or shown < frames:
            size = shutil.get_terminal_size()
            lines = render(snapshot(client), size.columns)[: max(1, size.lines - 1)]
            out.write(HOME + "".join(line + CLEAR_LINE + "\n" for line in lines) + CLEAR_BELOW)
            out.flush()
            shown += 1
            if frames is None or shown < frames:
                time.sleep(interval)
    finally:
        out.write(LEAVE)
        out.flush()
