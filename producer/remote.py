"""The CLI's job and run commands through the HTTP API, when SDQUEUE_API_URL is set.

`sdqueue submit`, `status`, `wait`, `fetch`, `cancel`, `run`, `runs` (list, show, cancel, retry)
and `export` then use producer.http.Client with SDQUEUE_API_URL and SDQUEUE_API_KEY, and nothing
of the database, the broker or storage: a laptop needs a URL and a key. They print what the local
commands print and exit the same: 0 ok, 1 a failed job or a refusal of the server (an outage, a
conflict, a key refused), 2 bad input (nothing was enqueued), 3 no such job or run, 4 a timeout.
Records are the API's: without the operator's fields (storage keys, lease holders), images by URL.

The other commands (worker, db, sweep, keys, beat, api, top, webhooks, reproduce) work on the database and
the broker directly, as without SDQUEUE_API_URL; with it set and no SDQUEUE_DATABASE_URL, they
refuse in one line rather than read an empty SQLite file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import TYPE_CHECKING, Callable
from urllib.parse import urljoin

from models.errors import ConfigError
from models.text import inert, state_counts
from producer.cli import (EXIT_ERROR, EXIT_NOT_FOUND, EXIT_TIMEOUT, EXIT_USAGE, _duration, _fail, _show,
                          _show_runs, defaults_from_args)

if TYPE_CHECKING:
    from producer.http import Client, Job, Run

# Commands that need the database and the broker: no API route does their work.
LOCAL_ONLY = ("worker", "db", "sweep", "keys", "beat", "api", "top", "webhooks", "reproduce")


def goes_remote(args: argparse.Namespace) -> bool:
    return args.command in COMMANDS


def check_local(command: str) -> None:
    if command in LOCAL_ONLY and not os.environ.get("SDQUEUE_DATABASE_URL"):
        raise ConfigError(f"sdqueue {command} works on the database and the broker directly, not through "
                          "SDQUEUE_API_URL: set SDQUEUE_DATABASE_URL and SDQUEUE_BROKER_URL to ones it can reach")


def main(args: argparse.Namespace) -> int:
    # httpx imports its own command line (click and rich, when installed: some 40% of its import
    # time) unless it cannot; this process never runs it, and `sdqueue status` starts that much sooner
    sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
    from producer import http

    try:
        api = http.Client()
    except ValueError as exc:  # SDQUEUE_API_URL that is no URL
        raise ConfigError(str(exc)) from None
    try:
        return COMMANDS[args.command](api, args)
    except http.WaitTimeout as exc:
        return _fail(str(exc), EXIT_TIMEOUT)
    except http.Invalid as exc:
        return _fail(exc.message, EXIT_USAGE)
    except http.NotFound as exc:
        return _fail(exc.message, EXIT_NOT_FOUND)
    except http.Unauthorized as exc:
        said = "is not set" if api.api_key is None else "was refused"
        return _fail(f"{exc.message} (SDQUEUE_API_KEY {said})", EXIT_ERROR)
    except http.ApiError as exc:  # a conflict, a limit, an outage, the server's own failure
        return _fail(exc.message, EXIT_ERROR)
    finally:
        api.close()


# -- jobs -----------------------------------------------------------------------------------------

def show(api: Client, job: Job, as_json: bool) -> None:
    """The job as `sdqueue status` shows it (`--json`: the API's record as it came)."""
    if as_json:
        print(json.dumps(job.raw, indent=1))
        return
    record = {"worker": None, "lease_expires_at": None, **job.raw}
    record["images"] = [{**image, "key": None, "location": urljoin(api.base_url + "/", image.get("url", ""))}
                        for image in job.raw.get("images") or ()]
    _show(record, False)


def submit(api: Client, args: argparse.Namespace) -> int:
    fields = {"prompt": args.prompt, **defaults_from_args(args)}
    job = api.submit(fields, image=args.image, mask=args.mask, depth_map=args.depth_map, priority=args.priority)
    if args.wait:
        job = api.wait(job.id, timeout=args.timeout)
        show(api, job, args.json)
        return 0 if job.state == "succeeded" else EXIT_ERROR
    if args.json:
        show(api, job, True)
    else:
        print(job.id)
    return 0


def status(api: Client, args: argparse.Namespace) -> int:
    show(api, api.get(args.job_id), args.json)
    return 0


def wait(api: Client, args: argparse.Namespace) -> int:
    if not args.progress:
        job = api.wait(args.job_id, timeout=args.timeout)
    else:
        from producer.progress import progress_bar

        with progress_bar() as on_event:
            job = api.wait(args.job_id, timeout=args.timeout, on_event=on_event)
    show(api, job, args.json)
    return 0 if job.state == "succeeded" else EXIT_ERROR


def fetch(api: Client, args: argparse.Namespace) -> int:
    job = api.get(args.job_id)
    if job.state != "succeeded":
        return _fail(f"job {args.job_id} is {job.state}: it has no images to fetch", EXIT_ERROR)
    for path in api.fetch(job.id, args.dir, force=args.force):
        print(inert(str(path)))
    return 0


def cancel(api: Client, args: argparse.Namespace) -> int:
    job = api.cancel(args.job_id)  # Conflict once it has ended: exit 1, the API's message
    print(f"{job.id} {job.state}")
    return 0


# -- runs -----------------------------------------------------------------------------------------

def run(api: Client, args: argparse.Namespace) -> int:
    from producer import http
    from producer.outputs import check_output, output_file

    # 1. the rejects file, checked before anything is sent: never the manifest, a folder or a
    #    device, nor a file that is there unless --force
    rejects = args.rejects or args.manifest.with_name(args.manifest.name + ".rejects.jsonl")
    rejects_file = check_output(rejects, force=args.force, inputs=[args.manifest]) if args.skip_invalid else None
    # 2. the manifest uploaded: the API validates every row before it writes anything
    started = time.monotonic()
    try:
        made = api.create_run(args.manifest, name=args.name, skip_invalid=args.skip_invalid, append=args.append,
                              priority=args.priority, defaults=defaults_from_args(args) or None)
    except http.Invalid as exc:
        if not isinstance(exc.body, dict) or "rejects" not in exc.body:
            raise
        first, *lines = exc.rejects
        print(inert(f"sdqueue: error: {args.manifest}: {first.replace('skip_invalid=true', '--skip-invalid')}"),
              file=sys.stderr)
        print(inert("\n".join(lines)), file=sys.stderr)
        return EXIT_USAGE
    except http.Conflict as exc:  # the name is taken by another source or other defaults: as RunExists
        return _fail(exc.message, EXIT_USAGE)
    seconds = time.monotonic() - started
    # 3. the refused rows the API listed (its first ones), whole or not at all
    if made.reject_count:
        assert rejects_file is not None
        with output_file(rejects_file, force=args.force) as part:
            with open(part, "w", encoding="utf-8") as out:
                for reject in made.rejects:
                    out.write(json.dumps({"line": reject.get("line"), "key": reject.get("key"),
                                          "problems": reject.get("errors")}) + "\n")
        listed = "" if len(made.rejects) == made.reject_count else f" (the first {len(made.rejects)})"
        print(inert(f"{made.reject_count} invalid row(s) skipped, written to {rejects}{listed}"), file=sys.stderr)
    rate = made.written / seconds if seconds > 0 else 0.0
    if args.json:
        print(json.dumps({"run": made.run.name, "run_id": made.run.id, "created": made.created,
                          "inserted": made.written, "seconds": seconds, "rate": round(rate, 1),
                          "reject_count": made.reject_count}))
    else:
        verb = "created" if made.created else "resumed"
        print(inert(f"run {made.run.name} {verb}: {made.written} job(s) enqueued in {seconds:.1f} s "
                    f"({rate:,.0f} jobs/s), {made.run.total - made.written} already there"))
    return 0


def runs(api: Client, args: argparse.Namespace) -> int:
    if args.runs_command is None:
        found = list(api.runs())
        if args.json:
            print(json.dumps([r.raw for r in found], indent=1))
        else:
            _show_runs(found)
    elif args.runs_command == "show":
        while True:
            one = api.run(args.name)
            if args.json:
                print(json.dumps(one.raw), flush=True)
            else:
                if args.watch and sys.stdout.isatty():
                    print("\x1b[H\x1b[J", end="")  # redraw in place
                print(describe_run(one), flush=True)
            if not args.watch or one.finished:
                return 0
            time.sleep(args.interval)
    elif args.runs_command == "cancel":
        which = "" if args.state == "all" else f" {args.state}"
        _, cancelled = api.cancel_run(args.name, args.state)
        print(inert(f"{cancelled}{which} job(s) of run {args.name} cancelled"))
    elif args.runs_command == "retry":
        _, retried = api.retry_run(args.name)
        print(inert(f"{retried} failed job(s) of run {args.name} queued again"))
    else:
        return _fail(f"runs {args.runs_command} works on the database directly: the API does not offer it "
                     "(run it where SDQUEUE_DATABASE_URL reaches the database, without SDQUEUE_API_URL)", EXIT_USAGE)
    return 0


def describe_run(run: Run) -> str:
    """`sdqueue runs show`'s lines, from the API's record (its rate is over the API's window)."""
    jobs = run.jobs
    done = jobs["succeeded"] + jobs["failed"] + jobs["cancelled"]
    eta = run.eta_seconds
    when = "done" if run.finished else ("unknown (no images in the last minutes)" if eta is None
                                        else _duration(eta))
    made = f"from schedule {run.schedule}" if run.schedule else f"{run.priority} priority"
    created = run.created_at.strftime("%Y-%m-%d %H:%M:%S") if run.created_at else "-"
    sealed = "" if run.sealed else "  (still being enqueued, or its enqueue was interrupted: run it again)"
    lines = [
        f"run      {run.name}  ({made}, created {created}){sealed}",
        f"jobs     {done}/{run.total} ended: " + state_counts(jobs),
        f"images   {run.images_done} done of {run.images_total}; {run.images_per_second:.2f} images/s; ETA {when}",
    ]
    return "\n".join(inert(line) for line in lines)


def export(api: Client, args: argparse.Namespace) -> int:
    refused = [option for option, given in (("--partial", args.partial), ("--shard-size", args.shard_size != 1000))
               if given]
    if refused:
        return _fail(f"{', '.join(refused)}: not offered through the API (it exports finished runs, with its own "
                     "shard size): leave them out, or export where SDQUEUE_DATABASE_URL reaches the database",
                     EXIT_USAGE)
    split = str(args.split) if args.split is not None else None
    started = time.monotonic()
    if str(args.dest).startswith("s3://"):
        # the API writes it to its own object store: the bucket and prefix are the server's
        made = api.export_run(args.run, format=args.format, split=split, to="s3")
        assert isinstance(made, dict)
        print(inert(f"exported {made.get('images')} image(s) of run {args.run} to {made.get('location')} as "
                    f"{args.format} in {time.monotonic() - started:.1f} s (the API's object store); URLs valid "
                    f"{made.get('expires_in')} s:"))
        for item in made.get("files") or ():
            print(inert(f"{item.get('name')}  {item.get('url')}"))
        return 0
    paths = api.export_run(args.run, args.dest, format=args.format, split=split, force=args.force)
    assert isinstance(paths, list)
    print(inert(f"exported run {args.run} to {args.dest} as {args.format}: {len(paths)} file(s) in "
                f"{time.monotonic() - started:.1f} s"))
    return 0


COMMANDS: dict[str, Callable[[Client, argparse.Namespace], int]] = {
    "submit": submit,
    "status": status,
    "wait": wait,
    "fetch": fetch,
    "cancel": cancel,
    "run": run,
    "runs": runs,
    "export": export,
}
