"""The `sdqueue` command.

Producer commands (submit, status, wait, fetch, cancel, db) import no worker code and no torch.
Worker commands (worker, models build-*, demo) import the worker lazily, when they run.
Errors a user can cause print one line and exit non-zero; no stack trace.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import stat
import sys
from pathlib import Path
from typing import Any, Callable

from models.errors import BadDestination, InvalidRequest, JobNotFound, JobTimeout, SdqueueError
from models.request import MAX_IMAGE_BYTES
from models.settings import load_settings
from producer.client import Client

EXIT_ERROR, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_TIMEOUT = 1, 2, 3, 4

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
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdqueue",
        description="Stable Diffusion 2.1 batch generation: producers enqueue jobs, GPU workers run them. "
        "Settings come from SDQUEUE_* variables (SDQUEUE_BROKER_URL, SDQUEUE_DATABASE_URL, "
        "SDQUEUE_STORAGE_URL, SDQUEUE_S3_ENDPOINT_URL, SDQUEUE_MODEL, ...).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    submit = commands.add_parser("submit", help="validate, record and enqueue one generation job")
    submit.add_argument("--prompt", required=True, help="text prompt (required, non-empty)")
    for option, kind, text in REQUEST_OPTIONS:
        submit.add_argument(option, type=kind, help=text)
    submit.add_argument("--image", type=Path, metavar="PATH", help="input image file: makes the job img2img")
    submit.add_argument("--use-compel", action="store_true", default=None, help="weighted prompts with compel")
    submit.add_argument("--wait", action="store_true", help="wait for the job to end")
    submit.add_argument("--timeout", type=float, help="with --wait: give up after this many seconds")
    submit.add_argument("--json", action="store_true", help="print the job record as JSON")

    status = commands.add_parser("status", help="show a job's state, seeds and images")
    status.add_argument("job_id")
    status.add_argument("--json", action="store_true", help="the whole record as JSON")

    wait = commands.add_parser("wait", help="wait until a job ends (exit 0 when it succeeded)")
    wait.add_argument("job_id")
    wait.add_argument("--timeout", type=float, help="give up after this many seconds (exit 4)")
    wait.add_argument("--json", action="store_true")

    fetch = commands.add_parser("fetch", help="download a job's images into a folder")
    fetch.add_argument("job_id")
    fetch.add_argument("dir", type=Path)

    cancel = commands.add_parser("cancel", help="cancel a queued or running job")
    cancel.add_argument("job_id")

    sweep = commands.add_parser(
        "sweep", help="once: put back jobs of dead workers (expired leases) and jobs whose message the broker lost, "
        "and delete objects no job references (every worker also does this every SDQUEUE_SWEEP_INTERVAL seconds)")
    sweep.add_argument("--orphan-grace", type=float, metavar="SECONDS",
                       help="delete unreferenced objects uploaded at least this long ago (default: SDQUEUE_ORPHAN_GRACE, 600)")

    db = commands.add_parser("db", help="database schema")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="COMMAND")
    db_commands.add_parser("upgrade", help="bring the database to this version's schema (alembic upgrade head)")
    db_commands.add_parser("current", help="show the database's schema revision")

    worker = commands.add_parser("worker", help="run a GPU worker: pins one pipeline, runs jobs from the broker")
    worker.add_argument("--model", help="registry name or diffusers folder (default: SDQUEUE_MODEL)")
    worker.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: SDQUEUE_DEVICE or auto)")
    worker.add_argument("--slots", type=int, help="jobs held at once, gathered into batches "
                        "(default: SDQUEUE_WORKER_SLOTS or 16)")
    worker.add_argument("--loglevel", default="INFO")

    models = commands.add_parser("models", help="model registry; build offline test models")
    model_commands = models.add_subparsers(dest="models_command", required=True, metavar="COMMAND")
    model_commands.add_parser("list", help="show the registry")
    for name, text in (("build-tiny", "tiny SD 2.1-architecture pipeline, random weights (a few MB)"),
                       ("build-arch", "full-size SD 2.1 768-v architecture, random weights (benchmarks)")):
        build = model_commands.add_parser(name, help=text)
        build.add_argument("dir", type=Path, nargs="?", help="where to save it (default: the data dir's models/)")
        build.add_argument("--seed", type=int, default=0, help="seed of the random weights")

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
        return COMMANDS[args.command](args)
    except InvalidRequest as exc:
        return _fail(str(exc), EXIT_USAGE)
    except JobNotFound as exc:
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
    print(f"sdqueue: error: {message}", file=sys.stderr)
    return code


def _client() -> Client:
    return Client(load_settings())


def request_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The request fields the user gave, as data for the schema."""
    fields: dict[str, Any] = {"prompt": args.prompt}
    for option, _, _ in REQUEST_OPTIONS:
        name = option.removeprefix("--").replace("-", "_")
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    if args.use_compel:
        fields["use_compel"] = True
    if args.image is not None:
        fields["image"] = read_image_file(args.image)
    return fields


def read_image_file(path: Path) -> bytes:
    """The bytes of a regular file within MAX_IMAGE_BYTES: never a device, FIFO or folder."""
    where = f"image={str(path)!r}"
    try:
        # O_NONBLOCK: opening a FIFO that has no writer must not hang; a regular file ignores it.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise InvalidRequest([f"{where}: cannot be read ({exc.strerror or exc})"]) from None
    try:
        info = os.fstat(fd)  # of what was opened, so a file swapped after a check cannot slip through
        if not stat.S_ISREG(info.st_mode):
            kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                     (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
            kind = next((name for test, name in kinds if test(info.st_mode)), "not a regular file")
            raise InvalidRequest([f"{where}: is {kind}, not a regular file"])
        too_large = f"{where}: file of {{}} bytes is larger than the bound of {MAX_IMAGE_BYTES} bytes"
        if info.st_size > MAX_IMAGE_BYTES:
            raise InvalidRequest([too_large.format(info.st_size)])
        # The size can lie (a file still growing, /proc): read one byte past the bound, never more.
        chunks, size = [], 0
        while size <= MAX_IMAGE_BYTES and (chunk := os.read(fd, MAX_IMAGE_BYTES + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
        if size > MAX_IMAGE_BYTES:
            raise InvalidRequest([too_large.format(f"more than {MAX_IMAGE_BYTES}")])
        return b"".join(chunks)
    except OSError as exc:
        raise InvalidRequest([f"{where}: cannot be read ({exc.strerror or exc})"]) from None
    finally:
        os.close(fd)


def cmd_submit(args: argparse.Namespace) -> int:
    client = _client()
    job_id = client.submit(request_from_args(args))
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
    record = _client().wait(args.job_id, timeout=args.timeout)
    _show(record, args.json)
    return 0 if record["state"] == "succeeded" else EXIT_ERROR


def cmd_fetch(args: argparse.Namespace) -> int:
    client = _client()
    record = client.get(args.job_id)
    if record["state"] != "succeeded":
        return _fail(f"job {args.job_id} is {record['state']}: it has no images to fetch", EXIT_ERROR)
    try:
        paths = client.fetch(args.job_id, args.dir)
    except BadDestination as exc:  # nothing was downloaded
        return _fail(str(exc), EXIT_USAGE)
    for path in paths:
        print(path)
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from models.jobs import IllegalTransition

    try:
        record = _client().cancel(args.job_id)
    except IllegalTransition as exc:
        return _fail(str(exc), EXIT_ERROR)
    print(f"{record['id']} {record['state']}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from models.sweep import Sweeper

    client = _client()
    report = Sweeper(client.settings, client.db, client.storage, client.send).sweep(
        orphan_grace=args.orphan_grace, force_scan=True)
    print(report)
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
    return run_worker(load_settings(**overrides), loglevel=args.loglevel)


def cmd_models(args: argparse.Namespace) -> int:
    from models.registry import REGISTRY, built_models_dir

    if args.models_command == "list":
        for spec in REGISTRY.values():
            where = spec.hub_id or f"built locally ({'sdqueue models build-tiny' if spec.name == 'tiny' else 'sdqueue models build-arch'})"
            print(f"{spec.name:10} {spec.native_size:5}px {spec.prediction_type:13} {where}  {spec.description}")
        return 0
    from worker.build import build_and_save

    kind = "tiny" if args.models_command == "build-tiny" else "sd21-arch"
    folder = args.dir or built_models_dir(load_settings().data_dir) / kind
    print(build_and_save(kind, folder, seed=args.seed))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from producer.demo import run_demo

    return run_demo(args.model or load_settings().model, args.dir)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "submit": cmd_submit,
    "status": cmd_status,
    "wait": cmd_wait,
    "fetch": cmd_fetch,
    "cancel": cmd_cancel,
    "sweep": cmd_sweep,
    "db": cmd_db,
    "worker": cmd_worker,
    "models": cmd_models,
    "demo": cmd_demo,
}


def _show(record: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(record, indent=1))
        return
    params = record["params"]
    print(f"job      {record['id']}")
    letter = ", dead letter" if record["dead_letter"] else ""
    held = f", held by {record['worker']} until {record['lease_expires_at']}" if record["lease_expires_at"] else ""
    print(f"state    {record['state']}  (attempts {record['attempts']}, failures {record['failures']}{letter}{held})")
    print(f"request  {record['mode']} {params['width']}x{params['height']} steps={params['num_inference_steps']} "
          f"guidance={params['guidance_scale']} num_images={params['num_images']} seed={record['seed']}"
          f"{' (drawn)' if record['seed_was_drawn'] else ''}")
    print(f"prompt   {params['prompt']}")
    if record["error"]:
        print(f"error    {record['error'].splitlines()[0]}")
    for image in record["images"]:
        print(f"image {image['index']}  seed={image['seed']}  {image['location'] or image['key']}")


if __name__ == "__main__":
    sys.exit(main())
