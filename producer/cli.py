"""The `sdqueue` command.

Producer commands (submit, status, wait, fetch, cancel, top, db) import no worker code and no torch.
Worker commands (worker, reproduce, models build-*, demo) import the worker lazily, when they run.
Errors a user can cause print one line and exit non-zero; no stack trace.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NoReturn

from models.errors import (BadDestination, BadInput, ConfigError, InvalidRequest, JobNotFound, JobTimeout, RunBusy,
                           RunNotFound, SdqueueError)
from models.text import inert, state_counts

if TYPE_CHECKING:
    from models.settings import Settings
    from producer.client import Client

EXIT_ERROR, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_TIMEOUT = 1, 2, 3, 4
PRIORITIES = ["interactive", "bulk"]

# Request fields as CLI options: (option, type, help). Only options given are sent, so every
# default lives in one place, the request schema.
REQUEST_OPTIONS: list[tuple[str, Callable[[str], Any], str]] = [
    ("--negative-prompt", str, "negative text prompt (default: empty)"),
    ("--num-images", int, "images to generate, 1..4 (default 1)"),
    ("--num-inference-steps", int, "denoising steps, 1..512 (default 25)"),
    ("--guidance-scale", float, "classifier-free guidance, 1..20 (default 7.5)"),
    ("--strength", float, "img2img: 1 ignores the image, 0 keeps it, 0..1 (default 0.8)"),
    ("--width", int, "output width in px: a multiple of 64 from 256 to 1024 (default 768)"),
    ("--height", int, "output height in px: a multiple of 64 from 256 to 1024 (default 768)"),
    ("--seed", int, "random seed >= 0; image i uses seed + i (default: drawn and recorded)"),
    ("--noise-level", int, "upscaler models: noise added to the input first, 0..350 (default 20)"),
    ("--model", str, "a registry model (`sdqueue models list`) or an allowed folder; its workers run the job "
                     "(default: SDQUEUE_DEFAULT_MODEL)"),
]


def finite_float(least: float, *, above: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number, at least `least` (more than it when `above`). A refusal
    is argparse's usage error (exit 2), never nan or inf reaching a sleep or a timedelta."""
    bound = f"{'more than' if above else 'at least'} {least:g}"

    def number(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a number") from None
        if not math.isfinite(value) or value < least or (above and value == least):
            raise argparse.ArgumentTypeError(f"{text[:40]!r}: must be a finite number {bound}")
        return value

    return number


def int_between(least: int, most: int) -> Callable[[str], int]:
    """An argparse type: a whole number from `least` to `most` (a database column's bound, a
    thread count that is a mistake beyond it)."""

    def whole_number(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a whole number") from None
        if not least <= value <= most:
            raise argparse.ArgumentTypeError(f"{text[:40]}: must be from {least} to {most}")
        return value

    return whole_number


positive_seconds = finite_float(0, above=True)
seconds = finite_float(0)
# Threads fetching at once (export), fire times listed, API processes: more is a mistake, not a wish.
MAX_CONCURRENCY, MAX_COUNT, MAX_API_WORKERS = 256, 1000, 256


def split_option(text: str) -> Any:
    """An argparse type: export's --split, parsed (producer/runs/splits.py) before anything is read."""
    from producer.runs.splits import parse_split

    try:
        return parse_split(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class Parser(argparse.ArgumentParser):
    """A bad option is one line, like every other refusal of the CLI (argparse would print the
    usage first): `sdqueue submit: error: argument --timeout: ...`; `--help` shows the usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, inert(f"{self.prog}: error: {message}") + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="sdqueue",
        description="Stable Diffusion 2.1 batch generation: producers enqueue jobs, GPU workers run them. "
        "Settings come from SDQUEUE_* variables (SDQUEUE_BROKER_URL, SDQUEUE_DATABASE_URL, "
        "SDQUEUE_STORAGE_URL, SDQUEUE_S3_ENDPOINT_URL, SDQUEUE_MODEL, ...). With SDQUEUE_API_URL (and "
        "SDQUEUE_API_KEY) set, submit, status, wait, fetch, cancel, run, runs and export go through the HTTP API "
        "instead; the other commands work on the database and broker directly.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    submit = commands.add_parser("submit", help="validate, record and enqueue one generation job")
    submit.add_argument("--prompt", required=True, help="text prompt (required, non-empty)")
    for option, kind, text in REQUEST_OPTIONS:
        submit.add_argument(option, type=kind, help=text)
    submit.add_argument("--image", type=Path, metavar="PATH", help="input image file: makes the job img2img")
    submit.add_argument("--mask", type=Path, metavar="PATH",
                        help="inpainting models: the mask, the image's size (white repaints, black keeps)")
    submit.add_argument("--depth-map", type=Path, metavar="PATH",
                        help="depth models: the depth map, brighter nearer, any size (default: estimated from the "
                             "image by the model's DPT)")
    submit.add_argument("--after", type=after_spec, metavar="JOB_ID[:INDEX]",
                        help="a follow-up: image INDEX (default 0) of that job is the input, once it succeeded "
                             "(img2img, inpainting with --mask, or upscaling, by --model)")
    submit.add_argument("--use-compel", action="store_true", default=None, help="weighted prompts with compel")
    submit.add_argument("--priority", choices=PRIORITIES, default="interactive",
                        help="interactive (default) runs before bulk work")
    submit.add_argument("--wait", action="store_true", help="wait for the job to end")
    submit.add_argument("--timeout", type=seconds, help="with --wait: give up after this many seconds")
    submit.add_argument("--json", action="store_true", help="print the job record as JSON")

    status = commands.add_parser("status", help="show a job's state, seeds and images")
    status.add_argument("job_id")
    status.add_argument("--json", action="store_true", help="the whole record as JSON")

    wait = commands.add_parser("wait", help="wait until a job ends (exit 0 when it succeeded)")
    wait.add_argument("job_id")
    wait.add_argument("--timeout", type=seconds, help="give up after this many seconds (exit 4)")
    wait.add_argument("--json", action="store_true")
    wait.add_argument("--progress", action="store_true", help="show the job's state and denoising steps on stderr")

    fetch = commands.add_parser("fetch", help="download a job's images into a folder")
    fetch.add_argument("job_id")
    fetch.add_argument("dir", type=Path)
    fetch.add_argument("--force", action="store_true", help="write over images already in the folder")

    cancel = commands.add_parser("cancel", help="cancel a queued or running job")
    cancel.add_argument("job_id")

    sweep_help = ("once: put back jobs of dead workers (expired leases) and jobs whose message the broker lost, "
        "and delete objects no job references (every worker also does this every SDQUEUE_SWEEP_INTERVAL seconds); "
        "it takes no lease until the database has answered for a whole lease since it came back or started, nor one "
        "whose worker's heartbeat is fresh in the worker registry")
    sweep = commands.add_parser("sweep", help=sweep_help, description=sweep_help)
    sweep.add_argument("--orphan-grace", type=seconds, metavar="SECONDS",
                       help="delete unreferenced objects uploaded at least this long ago (default: SDQUEUE_ORPHAN_GRACE, 600)")

    run = commands.add_parser(
        "run", help="enqueue a manifest (JSONL, CSV, Parquet: one request per row) or a grid (TOML) as a named run; "
        "again with the same name, it enqueues only the rows that are missing")
    run.add_argument("manifest", type=Path, metavar="MANIFEST")
    run.add_argument("--name", required=True, help="the run's name, unique (again, with the same manifest and "
                     "options: resume or complete that run; with others it is refused)")
    run.add_argument("--append", action="store_true",
                     help="add this manifest's rows to an existing run made from another source or other defaults")
    for option, kind, text in REQUEST_OPTIONS:
        run.add_argument(option, type=kind, help=f"default for rows without it: {text}")
    run.add_argument("--use-compel", action="store_true", default=None, help="default for rows without it: compel")
    run.add_argument("--priority", choices=PRIORITIES, default="bulk", help="the run's priority class (default bulk)")
    run.add_argument("--skip-invalid", action="store_true",
                     help="enqueue the valid rows and write the bad ones to a rejects file (default: refuse the whole file)")
    run.add_argument("--rejects", type=Path, metavar="PATH",
                     help="with --skip-invalid: where the bad rows go (default: MANIFEST.rejects.jsonl)")
    run.add_argument("--force", action="store_true",
                     help="write the rejects file over one that exists (again with --skip-invalid, it is there)")
    run.add_argument("--json", action="store_true", help="print the report as JSON")

    runs = commands.add_parser("runs", help="list runs with their jobs by state; show, cancel or retry one")
    runs.add_argument("--json", action="store_true")
    runs_commands = runs.add_subparsers(dest="runs_command", metavar="COMMAND")
    runs_show = runs_commands.add_parser("show", help="a run's counts, images done, images/s and ETA")
    runs_show.add_argument("name")
    runs_show.add_argument("--watch", action="store_true", help="keep it on screen, updated, until the run ends")
    runs_show.add_argument("--interval", type=positive_seconds, default=2.0,
                           help="with --watch: seconds between updates")
    runs_show.add_argument("--json", action="store_true")
    runs_cancel = runs_commands.add_parser("cancel", help="cancel a run's queued jobs (or running ones, or all)")
    runs_cancel.add_argument("name")
    runs_cancel.add_argument("--state", choices=["queued", "running", "all"], default="queued",
                             help="which jobs: queued (default; running ones finish), running, or all")
    runs_delete = runs_commands.add_parser(
        "delete", help="delete a run that has no queued or running job: its jobs, images and their objects, "
        "after a confirmation")
    runs_delete.add_argument("name")
    runs_delete.add_argument("--yes", action="store_true", help="do not ask (needed when not on a terminal)")
    runs_retry = runs_commands.add_parser("retry", help="queue a run's failed jobs again, with the same seeds")
    runs_retry.add_argument("name")

    top = commands.add_parser(
        "top", help="the deployment live: workers and what they run, queue depths, jobs by state, runs in progress")
    top.add_argument("--once", action="store_true", help="print one frame and exit (also when not on a terminal)")
    top.add_argument("--interval", type=positive_seconds, default=2.0, help="seconds between frames (default 2)")
    top.add_argument("--json", action="store_true", help="one frame as JSON")

    export = commands.add_parser(
        "export", help="write a run's images as a dataset (image folder, WebDataset shards, Parquet with the images, "
        "or a datasets.load_from_disk folder) to a folder or s3://bucket/prefix, each image checked against its "
        "recorded sha256")
    export.add_argument("run", metavar="RUN", help="the run's name")
    export.add_argument("dest", metavar="DEST", help="a folder, or s3://bucket/prefix (SDQUEUE_S3_* settings)")
    export.add_argument("--format", required=True, choices=["imagefolder", "webdataset", "parquet", "hf"])
    export.add_argument("--split", type=split_option, metavar="NAME=FRACTION,...",
                        help="e.g. train=0.98,validation=0.02: each row in one split, stable by its key")
    export.add_argument("--partial", action="store_true",
                        help="export the succeeded jobs of a run that has not finished yet")
    export.add_argument("--shard-size", type=int_between(1, 2**31 - 1), default=1000,
                        help="webdataset, parquet, hf: images per file (default 1000)")
    export.add_argument("--concurrency", type=int_between(1, MAX_CONCURRENCY), default=8,
                        help=f"images fetched at once, 1..{MAX_CONCURRENCY} (default 8)")
    export.add_argument("--force", action="store_true", help="write over an earlier export and any file in the way")

    db = commands.add_parser("db", help="database schema")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="COMMAND")
    db_commands.add_parser("upgrade", help="bring the database to this version's schema (alembic upgrade head)")
    db_commands.add_parser("current", help="show the database's schema revision")

    worker = commands.add_parser("worker", help="run a GPU worker: pins one pipeline, runs jobs from the broker")
    worker.add_argument("--model", help="registry name (`sdqueue models list`; standin: the stand-in GPU) or diffusers folder (default: SDQUEUE_MODEL)")
    worker.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: SDQUEUE_DEVICE or auto)")
    worker.add_argument("--slots", type=int_between(1, 1024), help="jobs held at once, gathered into batches, "
                        "1..1024 (default: SDQUEUE_WORKER_SLOTS or 16)")
    worker.add_argument("--loglevel", default="INFO")

    reproduce_help = ("make a succeeded job's images again on this machine from its record (model, scheduler, "
                      "parameters, seeds, input) and compare them with the stored ones: equal, or the largest "
                      "difference and PSNR; exit 0 when equal or within the tolerance, 1 when not")
    reproduce = commands.add_parser("reproduce", help=reproduce_help, description=reproduce_help)
    reproduce.add_argument("job_id", metavar="JOB")
    reproduce.add_argument("--index", type=int_between(0, 3), help="compare image I only (default: every image); "
                           "the job's images are made together, as the job runs alone")
    reproduce.add_argument("--model", help="registry name or diffusers folder instead of the recorded model")
    reproduce.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: SDQUEUE_DEVICE or auto)")
    reproduce.add_argument("--tolerance", type=int_between(0, 255), metavar="D",
                           help="accept a largest difference of D/255 (default: 1 on the recorded device type and "
                           "dtype, as batch mates may change a value by 1/255; none across them)")
    reproduce.add_argument("--out", type=Path, metavar="FILE", help="write the re-made image there (one image)")
    reproduce.add_argument("--force", action="store_true", help="with --out: write over a file that exists")
    reproduce.add_argument("--json", action="store_true", help="the comparison as JSON")

    webhooks = commands.add_parser(
        "webhooks", help="deliver webhooks: POST each ended job's record to its webhook_url, signed, with retries "
        "(no GPU; run one or more beside the API)")
    webhooks.add_argument("--concurrency", type=int, default=8, help="POSTs at once (default 8)")
    webhooks.add_argument("--loglevel", default="INFO")

    models = commands.add_parser("models", help="model registry; build offline test models")
    model_commands = models.add_subparsers(dest="models_command", required=True, metavar="COMMAND")
    model_commands.add_parser("list", help="show the registry")
    for name, text in (("build-tiny", "tiny SD 2.1-architecture pipelines, random weights (a few MB): tiny, and "
                                      "tiny-inpainting, tiny-upscaler and tiny-depth beside it"),
                       ("build-arch", "full-size SD 2.1 768-v architecture, random weights (benchmarks): sd21-arch, "
                                      "and sd21-arch-inpainting, sd21-arch-upscaler and sd21-arch-depth beside it")):
        build = model_commands.add_parser(name, help=text)
        build.add_argument("dir", type=Path, nargs="?", help="where to save it, its variants beside it as DIR-VARIANT "
                                                              "(default: the data dir's models/)")
        build.add_argument("--seed", type=int_between(0, 2**63 - 1), default=0, help="seed of the random weights")

    beat = commands.add_parser(
        "beat", help="fire cron schedules (a TOML file), each firing one run, exactly once however many beats run")
    beat.add_argument("--schedules", type=Path, required=True, metavar="FILE", help="the schedules file (TOML)")
    beat.add_argument("--loglevel", default="INFO")

    schedules = commands.add_parser("schedules", help="check a schedules file and show its next fire times")
    schedules_commands = schedules.add_subparsers(dest="schedules_command", required=True, metavar="COMMAND")
    schedules_list = schedules_commands.add_parser("list", help="each schedule, what it enqueues, its next fire times")
    schedules_list.add_argument("--schedules", type=Path, required=True, metavar="FILE", help="the schedules file (TOML)")
    schedules_list.add_argument("--count", type=int_between(1, MAX_COUNT), default=3,
                                help=f"fire times shown per schedule, 1..{MAX_COUNT} (default 3)")

    api = commands.add_parser(
        "api", help="serve the HTTP API (OpenAPI at /openapi.json, docs at /docs); keys from `sdqueue keys create`, "
        "none with SDQUEUE_API_AUTH=off")
    api.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    api.add_argument("--port", type=int_between(1, 65535), default=8000, help="port to listen on (default 8000)")
    api.add_argument("--workers", type=int_between(1, MAX_API_WORKERS), default=1, help="processes (default 1)")
    api.add_argument("--loglevel", default="info", choices=["critical", "error", "warning", "info", "debug"])

    keys = commands.add_parser("keys", help="API keys: create (shows the token once), list, revoke")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    keys_create = keys_commands.add_parser("create", help="make a key; prints its token and webhook secret, once")
    keys_create.add_argument("name", help="the key's name, unique")
    keys_create.add_argument("--rate", metavar="R/min", help="at most R submits a minute (default: no limit)")
    keys_create.add_argument("--max-queued", type=int, metavar="N",
                             help="at most N of its jobs queued or running at once (default: no cap)")
    keys_create.add_argument("--bulk-only", action="store_true", help="its jobs are bulk priority, never interactive")
    keys_create.add_argument("--admin", action="store_true",
                             help="it sees every job and run (the operator's and other keys'), in the API and the dashboard")
    keys_list = keys_commands.add_parser("list", help="every key, with its limits; never a token")
    keys_list.add_argument("--json", action="store_true")
    keys_revoke = keys_commands.add_parser("revoke", help="revoke a key: its token is refused from now on")
    keys_revoke.add_argument("name")

    demo = commands.add_parser("demo", help="run a handful of jobs through an in-process broker and worker")
    demo.add_argument("--model", help="registry name or diffusers folder (default: SDQUEUE_MODEL, i.e. sd21)")
    demo.add_argument("--dir", type=Path, default=Path("sdqueue-demo"), help="where the demo keeps its "
                      "SQLite file, images and built models (default: ./sdqueue-demo)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Pillow logs what it thinks of a hostile file as well as raising: the refusal is the one line.
    logging.getLogger("PIL").addHandler(logging.NullHandler())
    try:
        if os.environ.get("SDQUEUE_API_URL"):  # job and run commands through the HTTP API
            from producer import remote

            if remote.goes_remote(args):
                return remote.main(args)
            remote.check_local(args.command)
        return COMMANDS[args.command](args)
    except (InvalidRequest, BadDestination) as exc:
        return _fail(str(exc), EXIT_USAGE)
    except BadInput as exc:  # a manifest, schedules file or run name that cannot be used
        return _fail(str(exc), EXIT_USAGE)
    except RunBusy as exc:
        return _fail(str(exc), EXIT_ERROR)
    except (JobNotFound, RunNotFound) as exc:
        return _fail(str(exc), EXIT_NOT_FOUND)
    except JobTimeout as exc:
        return _fail(str(exc), EXIT_TIMEOUT)
    except SdqueueError as exc:
        return _fail(str(exc), EXIT_ERROR)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `sdqueue status ID --json | head`
        sys.stderr.close()
        return 0


def _fail(message: str, code: int) -> int:
    # A message can quote a user's value: it reaches the terminal inert, on one line.
    print(f"sdqueue: error: {inert(message)}", file=sys.stderr)
    return code


def _client() -> Client:
    from producer.client import Client

    return Client(load_settings())


# Each command imports what it uses, when it runs: pydantic-settings, Pillow, SQLAlchemy and Celery
# cost 0.3 s and more, so `--help` and the commands that go through the API (producer/remote.py)
# load none of them.
def load_settings(**overrides: Any) -> Settings:
    from models.settings import load_settings

    return load_settings(**overrides)


def configure_logging(*args: Any, **kwargs: Any) -> Any:
    from models.logs import configure_logging

    return configure_logging(*args, **kwargs)


def make_handler(*args: Any, **kwargs: Any) -> Any:
    from models.logs import make_handler

    return make_handler(*args, **kwargs)


def redirect_std_streams(*args: Any, **kwargs: Any) -> Any:
    from models.logs import redirect_std_streams

    return redirect_std_streams(*args, **kwargs)


def parse_request(data: Any, settings: Any = None) -> Any:
    from models.request import parse_request

    return parse_request(data, settings)


def read_image_file(path: Path, field: str = "image") -> bytes:
    from producer.files import read_image_file

    return read_image_file(path, field=field)


def after_spec(text: str) -> dict[str, Any]:
    """An argparse type: JOB_ID[:INDEX] as the request's `after` ({"job": JOB_ID, "index": INDEX})."""
    from models.request import after_from_text

    after = after_from_text(text)
    if after is None:
        raise argparse.ArgumentTypeError(f"{text[:60]!r}: must be JOB_ID or JOB_ID:INDEX (INDEX 0..3, the image of "
                                         "that job to follow)")
    return after


def request_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The request fields the user gave, as data for the schema."""
    fields: dict[str, Any] = {"prompt": args.prompt, **defaults_from_args(args)}
    if getattr(args, "after", None) is not None:
        fields["after"] = args.after
    if args.image is not None:
        fields["image"] = read_image_file(args.image)
    if args.mask is not None:
        fields["mask"] = read_image_file(args.mask, field="mask")
    if args.depth_map is not None:
        fields["depth_map"] = read_image_file(args.depth_map, field="depth_map")
    return fields


def defaults_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The request options given (not the prompt or image)."""
    fields: dict[str, Any] = {}
    for option, _, _ in REQUEST_OPTIONS:
        name = option.removeprefix("--").replace("-", "_")
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    if args.use_compel:
        fields["use_compel"] = True
    return fields


def cmd_submit(args: argparse.Namespace) -> int:
    client = _client()
    job_id = client.submit(request_from_args(args), priority=args.priority)
    if args.wait:
        record = client.wait(job_id, timeout=args.timeout)
        _show(record, args.json)
        return 0 if record["state"] == "succeeded" else EXIT_ERROR
    if args.json:
        print(json.dumps(client.get(job_id), indent=1))
    else:
        print(job_id)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    _show(_client().get(args.job_id), args.json)
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    client = _client()
    try:
        if not args.progress:
            record = client.wait(args.job_id, timeout=args.timeout)
        else:
            from producer.progress import progress_bar

            with progress_bar() as on_event:
                record = client.wait(args.job_id, timeout=args.timeout, on_event=on_event)
    finally:
        client.close()
    _show(record, args.json)
    return 0 if record["state"] == "succeeded" else EXIT_ERROR


def cmd_fetch(args: argparse.Namespace) -> int:
    client = _client()
    record = client.get(args.job_id)
    if record["state"] != "succeeded":
        return _fail(f"job {args.job_id} is {record['state']}: it has no images to fetch", EXIT_ERROR)
    try:
        paths = client.fetch(args.job_id, args.dir, force=args.force)
    except BadDestination as exc:  # nothing was downloaded
        return _fail(str(exc), EXIT_USAGE)
    for path in paths:
        print(inert(str(path)))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from models.jobs import IllegalTransition

    try:
        record = _client().cancel(args.job_id)
    except IllegalTransition as exc:
        return _fail(str(exc), EXIT_ERROR)
    print(f"{record['id']} {record['state']}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from producer.outputs import check_output, output_file
    from producer.runs.enqueue import check_run, enqueue_run
    from producer.runs.manifest import format_rejects, load_manifest, write_rejects

    defaults = defaults_from_args(args)
    settings = load_settings()
    parse_request({"prompt": "-", **defaults}, settings)  # a bad option is refused once, not once per row
    # 1. every row read and validated before anything is written
    manifest = load_manifest(args.manifest, defaults, settings=settings)
    if manifest.reject_count and not args.skip_invalid:
        print(inert(f"sdqueue: error: {args.manifest}: {manifest.reject_count} of "
                    f"{manifest.reject_count + len(manifest.rows)} rows are invalid; nothing was enqueued "
                    "(--skip-invalid enqueues the valid ones)"), file=sys.stderr)
        print(inert(format_rejects(manifest.rejects, total=manifest.reject_count)), file=sys.stderr)
        return EXIT_USAGE
    # the rejects file, checked before anything is enqueued: never the manifest, a folder or a
    # device, nor a file that is there unless --force
    rejects = args.rejects or args.manifest.with_name(args.manifest.name + ".rejects.jsonl")
    rejects_file = check_output(rejects, force=args.force, inputs=[args.manifest]) if manifest.reject_count else None
    from producer.client import Client

    configure_logging(settings, "WARNING")  # the report is the output; the log says what went wrong
    client = Client(settings)
    try:
        # 2. a run of that name must be this one (its source and defaults), unless appending
        check_run(client, args.name, manifest, defaults, append=args.append)
        if manifest.reject_count:
            assert rejects_file is not None
            with output_file(rejects_file, force=args.force) as part:  # whole or not at all
                write_rejects(manifest.all_rejects(), part)
            print(inert(f"{manifest.reject_count} invalid row(s) skipped, written to {rejects}"), file=sys.stderr)
        # 3. written and sent in batches; the same command again resumes
        report = enqueue_run(client, args.name, manifest, defaults=defaults, priority=args.priority,
                             append=args.append)
    finally:
        client.close()
    assert report is not None
    print(json.dumps({**vars(report), "rate": round(report.rate, 1)}) if args.json else inert(str(report)))
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from producer.runs import status

    client = _client()
    try:
        if args.runs_command is None:
            runs = status.list_runs(client)
            if args.json:
                print(json.dumps([run.as_dict() for run in runs], indent=1))
            else:
                _show_runs(runs)
        elif args.runs_command == "show":
            return _show_run(client, args)
        elif args.runs_command == "cancel":
            which = "" if args.state == "all" else f" {args.state}"
            cancelled = status.cancel_run(client, args.name, args.state)
            print(inert(f"{cancelled}{which} job(s) of run {args.name} cancelled"))
        elif args.runs_command == "delete":
            return _delete_run(client, args)
        elif args.runs_command == "retry":
            print(inert(f"{status.retry_run(client, args.name)} failed job(s) of run {args.name} queued again"))
    finally:
        client.close()
    return 0


def _delete_run(client: Client, args: argparse.Namespace) -> int:
    from producer.runs import status

    contents = status.run_contents(client, args.name)
    what = f"{contents.jobs} job(s), {contents.images} image(s) and {contents.objects} object(s)"
    if contents.unfinished:
        return _fail(f"run {args.name!r} has {contents.unfinished} queued or running job(s): cancel them first "
                     f"(sdqueue runs cancel {args.name} --state all)", EXIT_ERROR)
    if not args.yes:
        if not sys.stdin.isatty():
            return _fail(f"deleting run {args.name!r} ({what}) needs a confirmation: --yes, when not on a terminal",
                         EXIT_USAGE)
        answer = input(inert(f"Delete run {args.name!r}: {what}? Type the run's name to confirm: "))
        if answer != args.name:
            return _fail("not confirmed: nothing was deleted", EXIT_ERROR)
    deleted = status.delete_run(client, args.name)
    print(inert(f"run {args.name} deleted: {deleted.jobs} job(s), {deleted.images} image(s), "
                f"{deleted.objects} object(s)"))
    return 0


def _show_runs(runs: list[Any]) -> None:
    print(f"{'RUN':32} {'PRIORITY':11} {'CREATED':20} {'QUEUED':>8} {'RUNNING':>8} {'DONE':>8} {'FAILED':>7} "
          f"{'CANCELLED':>9} {'TOTAL':>8}")
    for run in runs:
        jobs = run.jobs
        print(f"{inert(run.name):32} {inert(run.priority):11} {run.created_at.strftime('%Y-%m-%d %H:%M:%S'):20} "
              f"{jobs['queued']:>8} {jobs['running']:>8} {jobs['succeeded']:>8} {jobs['failed']:>7} "
              f"{jobs['cancelled']:>9} {run.total:>8}")


def _show_run(client: Client, args: argparse.Namespace) -> int:
    import time

    from producer.runs import status

    terminal = sys.stdout.isatty()
    while True:
        run = status.run_status(client, args.name)
        if args.json:
            print(json.dumps(run.as_dict()), flush=True)
        else:
            if args.watch and terminal:
                print("\x1b[H\x1b[J", end="")  # redraw in place
            print(_describe_run(run), flush=True)
        if not args.watch or run.finished:
            return 0
        time.sleep(args.interval)


def _describe_run(run: Any) -> str:
    jobs, total = run.jobs, run.total
    done = jobs["succeeded"] + jobs["failed"] + jobs["cancelled"]
    eta = run.eta_seconds
    when = "done" if run.finished else ("unknown (no images in the last minutes)" if eta is None else _duration(eta))
    made = f"from schedule {run.schedule}" if run.schedule else f"{run.priority} priority"
    sealed = "" if run.sealed else "  (still being enqueued, or its enqueue was interrupted: run it again)"
    lines = [
        f"run      {run.name}  ({made}, created {run.created_at.strftime('%Y-%m-%d %H:%M:%S')}){sealed}",
        f"jobs     {done}/{total} ended: " + state_counts(jobs),
        f"images   {run.images_done} done of {sum(run.images.values())}; "
        f"{run.rate:.2f} images/s over the last {_duration(run.window)}; ETA {when}",
    ]
    return "\n".join(inert(line) for line in lines)  # names and schedules are users' words


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def cmd_top(args: argparse.Namespace) -> int:
    from producer import top

    client = _client()
    try:
        if args.json:
            print(json.dumps(top.snapshot(client), indent=1))
        elif args.once or not sys.stdout.isatty():
            width = shutil.get_terminal_size().columns if sys.stdout.isatty() else 10_000  # a pipe: whole lines
            print("\n".join(top.render(top.snapshot(client), width)))
        else:
            try:
                top.watch(client, args.interval)
            except KeyboardInterrupt:  # how one leaves it
                pass
    finally:
        client.close()
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from producer.runs.export import export_run

    report = export_run(load_settings(), args.run, args.dest, format=args.format, partial=args.partial,
                        shard_size=args.shard_size, concurrency=args.concurrency, force=args.force,
                        split=args.split)
    print(inert(str(report)))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from models.errors import ServiceUnavailable
    from models.outage import wait_out
    from models.sweep import Sweeper
    from producer.client import Client

    settings = load_settings()
    configure_logging(settings, "WARNING")  # the report is the output; the log says what went wrong
    unreachable: list[ServiceUnavailable] = []

    def connect() -> Client:
        try:
            return Client(settings)
        except ServiceUnavailable as exc:
            unreachable.append(exc)
            raise

    # Run during an outage (a CronJob fires whatever the database does), it waits the outage out;
    # then, like every sweeper, it takes no lease back before the database has answered for a
    # whole lease since it came back or started: its workers renew their leases first.
    client = wait_out(connect, "sweep: the database", timeout=settings.outage_timeout)
    try:
        sweeper = Sweeper(client.settings, client.db, client.storage, client.send)
        if unreachable:
            sweeper.database_lost()
        sweeper.settle(say=lambda line: print(line, flush=True))
        print(sweeper.sweep(orphan_grace=args.orphan_grace, force_scan=True))
    finally:
        client.close()
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    from models import db

    settings = load_settings()
    if args.db_command == "upgrade":
        db.upgrade(settings.database_url)
    engine = db.make_engine(settings.database_url)
    try:
        current = db.current_revision(engine)
    finally:
        engine.dispose()
    print(f"schema revision: {current or 'none'} (this sdqueue needs {db.head_revision()})")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from worker.main import run_worker

    overrides = {k: v for k, v in (("model", args.model), ("device", args.device), ("worker_slots", args.slots)) if v}
    try:
        settings = load_settings(**overrides)
    except ConfigError:
        if os.environ.get("SDQUEUE_LOG_FORMAT") == "json":  # the refusal is a JSON line too
            logging.getLogger().addHandler(make_handler("json"))
            redirect_std_streams()
        raise
    return run_worker(settings, loglevel=args.loglevel)


def cmd_reproduce(args: argparse.Namespace) -> int:
    from worker.reproduce import ImageNotFound, reproduce

    settings = load_settings(**({"device": args.device} if args.device else {}))
    configure_logging(settings, "WARNING")  # the comparison is the output
    try:
        result = reproduce(settings, args.job_id, index=args.index, model=args.model, tolerance=args.tolerance,
                           out=args.out, force=args.force)
    except ImageNotFound as exc:
        return _fail(str(exc), EXIT_NOT_FOUND)
    if args.json:
        print(json.dumps(result.as_dict(), indent=1))
    else:
        print("\n".join(inert(line) for line in result.lines()))
    return 0 if result.ok else EXIT_ERROR


def cmd_webhooks(args: argparse.Namespace) -> int:
    from producer.webhooks import run_webhooks

    if args.concurrency < 1:
        return _fail(f"--concurrency={args.concurrency}: must be at least 1", EXIT_USAGE)
    return run_webhooks(load_settings(), concurrency=args.concurrency, loglevel=args.loglevel)


def cmd_models(args: argparse.Namespace) -> int:
    from models.registry import REGISTRY, built_models_dir

    if args.models_command == "list":
        settings = load_settings()
        print(f"{'MODEL':22} {'MODES':16} {'SIZE':>6}  WEIGHTS")
        for spec in REGISTRY.values():
            if spec.backend == "standin":
                where = "no weights (worker/standin.py)"
            elif spec.hub_id is not None:
                where = spec.hub_id
            else:
                built = (built_models_dir(settings.data_dir) / spec.name / "model_index.json").is_file()
                command = "build-tiny" if spec.name.startswith("tiny") else "build-arch"
                where = f"random, built here ({'built' if built else 'not built yet'}: sdqueue models {command})"
            default = " (the default)" if spec.name == settings.default_model else ""
            print(f"{spec.name:22} {','.join(spec.modes):16} {spec.native_size:>4}px  {where}{default}")
            print(f"{'':22} {spec.description}")
            print(f"{'':22} inputs: {spec.inputs}")
        return 0
    from worker.build import VARIANTS, build_and_save

    kind = "tiny" if args.models_command == "build-tiny" else "sd21-arch"
    folder = args.dir or built_models_dir(load_settings().data_dir) / kind
    # The architecture and each of its variants (tiny-inpainting, ...), beside it
    for variant in VARIANTS:
        print(build_and_save(f"{kind}-{variant}" if variant else kind,
                             folder.with_name(f"{folder.name}-{variant}") if variant else folder, seed=args.seed))
    return 0


def cmd_beat(args: argparse.Namespace) -> int:
    from producer.runs.schedules import run_beat

    return run_beat(args.schedules, loglevel=args.loglevel)


def cmd_schedules(args: argparse.Namespace) -> int:
    from producer.runs.schedules import describe, load_schedules

    print(describe(load_schedules(args.schedules, settings=load_settings()), args.count))
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    from producer.api.serve import run_api

    return run_api(load_settings(), host=args.host, port=args.port, workers=args.workers, log_level=args.loglevel)


def cmd_keys(args: argparse.Namespace) -> int:
    from models.db import Database
    from producer.api import keys

    rate = args.rate.removesuffix("/min") if getattr(args, "rate", None) else None
    if rate is not None and not (rate.isascii() and rate.isdigit() and len(rate) <= 20):  # int() of 5,000 digits raises
        return _fail(f"--rate={args.rate[:40]!r}: must be a number of submits a minute from 1 to {keys.MAX_BOUND}, "
                     "e.g. 60 or 60/min", EXIT_USAGE)
    db = Database(load_settings().database_url)
    try:
        if args.keys_command == "create":
            made = keys.create_key(db, args.name, rate_per_minute=int(rate) if rate else None,
                                   max_queued=args.max_queued, bulk_only=args.bulk_only, admin=args.admin)
            print(f"API key {made.key.name!r} created. Its token is shown this once: keep it now.")
            print(f"token           {made.token}")
            print(f"webhook secret  {made.key.webhook_secret}")
        elif args.keys_command == "list":
            _show_keys(keys.list_keys(db), args.json)
        elif args.keys_command == "revoke":
            key = keys.revoke_key(db, args.name)
            print(f"API key {key.name!r} revoked at {key.revoked_at:%Y-%m-%d %H:%M:%S}")
    except keys.BadKeyOption as exc:
        return _fail(str(exc), EXIT_USAGE)
    except keys.KeyNotFound as exc:
        return _fail(str(exc), EXIT_NOT_FOUND)
    finally:
        db.dispose()
    return 0


def _show_keys(found: list[Any], as_json: bool) -> None:
    rows = [{"name": k.name, "token_prefix": k.token_prefix, "rate_per_minute": k.rate_per_minute,
             "max_queued": k.max_queued, "bulk_only": k.bulk_only, "admin": k.admin, "created_at": k.created_at.isoformat(),
             "revoked_at": k.revoked_at.isoformat() if k.revoked_at else None} for k in found]
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    print(f"{'NAME':24} {'TOKEN':16} {'RATE/MIN':>8} {'MAX QUEUED':>10} {'BULK ONLY':9} {'ADMIN':5} {'CREATED':20} REVOKED")
    for row in rows:
        print(f"{inert(row['name']):24} {inert(row['token_prefix']) + '...':16} {row['rate_per_minute'] or '-':>8} "
              f"{row['max_queued'] or '-':>10} {'yes' if row['bulk_only'] else 'no':9} {'yes' if row['admin'] else 'no':5} "
              f"{row['created_at'][:19]:20} "
              f"{(row['revoked_at'] or '-')[:19]}")


def cmd_demo(args: argparse.Namespace) -> int:
    from producer.demo import run_demo

    return run_demo(args.model or load_settings().model, args.dir)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "submit": cmd_submit,
    "status": cmd_status,
    "wait": cmd_wait,
    "fetch": cmd_fetch,
    "cancel": cmd_cancel,
    "run": cmd_run,
    "runs": cmd_runs,
    "top": cmd_top,
    "export": cmd_export,
    "sweep": cmd_sweep,
    "db": cmd_db,
    "worker": cmd_worker,
    "reproduce": cmd_reproduce,
    "webhooks": cmd_webhooks,
    "models": cmd_models,
    "beat": cmd_beat,
    "schedules": cmd_schedules,
    "demo": cmd_demo,
    "api": cmd_api,
    "keys": cmd_keys,
}


def _show(record: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(record, indent=1))
        return
    params = record["params"]
    letter = ", dead letter" if record["dead_letter"] else ""
    held = f", held by {record['worker']} until {record['lease_expires_at']}" if record["lease_expires_at"] else ""
    run = f", run {record['run_id']} key {record['run_key']}" if record["run_id"] else ""
    lines = [
        f"job      {record['id']}",
        f"state    {record['state']}  (attempts {record['attempts']}, failures {record['failures']}{letter}{held})",
        f"priority {record['priority']}{run}",
        f"model    {record['model'] or '-'}",
        f"request  {record['mode']} {params['width']}x{params['height']} steps={params['num_inference_steps']} "
        f"guidance={params['guidance_scale']} num_images={params['num_images']} seed={record['seed']}"
        f"{' (drawn)' if record['seed_was_drawn'] else ''}",
        f"prompt   {params['prompt']}",
    ]
    if record.get("after"):
        lines.append(f"after    job {record['after']['job']} image {record['after']['index']} (its input)")
    if record.get("followers"):
        lines.append(f"followed by {', '.join(record['followers'])}")
    if record["error"]:
        first = record["error"].split("\n", 1)[0]  # not splitlines: a CR in it is shown, not a line break
        lines.append(f"error    {first}")
    for image in record["images"]:
        lines.append(f"image {image['index']}  seed={image['seed']}  {image['location'] or image['key']}")
    # A prompt, an error, a worker's name or a key is anyone's text: none may act on the terminal
    # (an ESC sequence clearing the screen, a CR printing a false state over the true one).
    print("\n".join(inert(line) for line in lines))

if __name__ == "__main__":
    sys.exit(main())
