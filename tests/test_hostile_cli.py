"""Careless and hostile input through the real CLI, part 2 (issue 14).

- What the CLI and `top` print from a user (a prompt, an error, a worker's or a run's name, a key
  name, a schedules file's path) cannot act on the terminal: an ESC sequence or a CR holding a
  fake `state succeeded` line is shown escaped. Such rows are written straight into the database:
  old rows and other writers may hold what validation now refuses.
- An output path (a run's rejects, an export, fetched images) never writes over an input, nor
  over an existing file without --force; a folder, a device or a missing folder is refused before
  anything is enqueued or downloaded; a full disk is one line and leaves no file behind.
- Every number option is bounded: nan, inf, negative or absurd values are argparse's usage error
  (exit 2), never a traceback; an API key's bounds are the columns' (no SQL with its parameters,
  the new key's secret among them, ever reaches the terminal).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from sqlalchemy import delete, func, select

from models.request import parse_request
from models.tables import ApiKey, Image, Job, Run, utcnow
from producer.cli import main
from tests.conftest import small
from tests.test_hostile_input import assert_one_line_refusal, sdqueue

ESCAPES = "\x1b[2J\rstate    succeeded"  # clears the screen, then prints a false state over the line
SHOWN = "\\x1b[2J\\rstate    succeeded"  # what inert makes of it
# Any control character but newline: what must never reach the terminal from a user.
CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture
def rows(client) -> Iterator[dict[str, list[str]]]:  # type: ignore[no-untyped-def]
    """Ids of rows a test wrote straight into the database, deleted afterwards."""
    made: dict[str, list[str]] = {"jobs": [], "runs": [], "keys": []}
    yield made
    with client.db.session() as session:
        session.execute(delete(Job).where(Job.id.in_(made["jobs"])))  # images go with them
        session.execute(delete(Run).where(Run.id.in_(made["runs"])))
        session.execute(delete(ApiKey).where(ApiKey.id.in_(made["keys"])))


def add_job(client, rows, *, state: str = "succeeded", prompt: str = "a lighthouse",  # type: ignore[no-untyped-def]
            images: list[bytes] | None = None, **fields: Any) -> str:
    """A job row (no message: no worker sees it) with its images stored and recorded."""
    images = images or []
    job_id = str(uuid.uuid4())
    params = {**parse_request(small(prompt="-", seed=1, num_images=max(1, len(images)))).parameters(), "seed": 1,
              "prompt": prompt}  # as a submit records it, but for a prompt validation may now refuse
    with client.db.session() as session:
        session.add(Job(id=job_id, state=state, mode="txt2img", params=params,
                        seed=1, width=256, height=256, num_inference_steps=3, num_images=max(1, len(images)),
                        queue="test-hostile-nowhere", enqueued_at=utcnow(), priority="bulk", **fields))
    rows["jobs"].append(job_id)
    for index, data in enumerate(images):
        key = f"images/{job_id}/0/{index}.png"
        client.storage.put(key, data, "image/png")
        with client.db.session() as session:
            session.add(Image(job_id=job_id, index=index, seed=1 + index, object_key=key,
                              sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data), width=256, height=256))
    return job_id


def add_run(client, rows, name: str, **fields: Any) -> str:  # type: ignore[no-untyped-def]
    run_id = str(uuid.uuid4())
    with client.db.session() as session:
        session.add(Run(id=run_id, name=name, defaults={}, priority="bulk", sealed_at=utcnow(), **fields))
    rows["runs"].append(run_id)
    return run_id


@pytest.fixture
def enqueued(client, settings) -> Callable[[], tuple[int, int, int]]:  # type: ignore[no-untyped-def]
    """(job rows, run rows, messages in the test's queues): what a refused run could have left."""
    import redis

    from models.constants import worker_queues

    broker = redis.Redis.from_url(settings.broker_url)

    def count() -> tuple[int, int, int]:
        with client.db.session() as session:
            jobs = session.scalar(select(func.count()).select_from(Job))
            runs = session.scalar(select(func.count()).select_from(Run))
        return jobs or 0, runs or 0, sum(broker.llen(queue) for queue in worker_queues(settings.queue, settings.model))

    yield count
    broker.close()


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Callable[[str], Path]]:  # type: ignore[no-untyped-def]
    """A tmpfs of the given size, mounted as tests/faults.py mounts the spool's (root only)."""
    from tests.faults import small_disk as mount

    mounted: list[Path] = []

    def make(size: str) -> Path:
        folder = tmp_path / f"disk{len(mounted)}"
        if os.geteuid() != 0 or not mount(folder, size, lambda line: None):
            pytest.skip("mounting a small tmpfs needs root")
        mounted.append(folder)
        return folder

    yield make
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def files_in(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def assert_inert(text: str) -> None:
    assert not CONTROL.search(text), repr(text)
    assert "\u202e" not in text


# --- 1. terminal escapes ------------------------------------------------------------------------


def test_status_wait_runs_keys_and_top_show_users_text_inert(client, settings, rows):
    run_name = "city\x1b[31m-run\r"
    run_id = add_run(client, rows, run_name, schedule="night\x1b[2Jly")
    running = add_job(client, rows, state="running", prompt="a lighthouse" + ESCAPES, run_id=run_id,
                      run_key="row\x1b[Hkey", worker="gpu\x1b[2J-worker", lease_owner="elsewhere",
                      lease_expires_at=utcnow() + timedelta(hours=1))
    failed = add_job(client, rows, state="failed", prompt="\u202eevil", run_id=run_id, run_key="row-2",
                     error="CUDA\x1b[2J\rstate    succeeded\nsecond line")
    key_id = str(uuid.uuid4())
    with client.db.session() as session:
        session.add(ApiKey(id=key_id, name="ops\x1b[2J\rkey", token_sha256=uuid.uuid4().hex * 2,
                           token_prefix="sdq_abcdefgh", webhook_secret="whsec_x"))
    rows["keys"].append(key_id)

    # status: the prompt's escapes shown, not acted on; the true state is the only state line
    status = sdqueue("status", running)
    assert status.returncode == 0, status.stderr
    assert_inert(status.stdout)
    assert f"prompt   a lighthouse{SHOWN}" in status.stdout
    [state] = [line for line in status.stdout.splitlines() if line.startswith("state")]  # a CR would make two
    assert state.startswith("state    running")
    assert "held by gpu\\x1b[2J-worker" in status.stdout and "key row\\x1b[Hkey" in status.stdout
    # --json stays JSON, the prompt whole
    assert json.loads(sdqueue("status", running, "--json").stdout)["params"]["prompt"] == "a lighthouse" + ESCAPES

    # wait: an ended job's error, its first line only, inert; a bidi override escaped
    waited = sdqueue("wait", failed, "--timeout", "5")
    assert waited.returncode == 1, waited.stderr
    assert_inert(waited.stdout)
    assert "error    CUDA\\x1b[2J\\rstate    succeeded" in waited.stdout and "second line" not in waited.stdout
    assert "prompt   \\u202eevil" in waited.stdout

    # runs, runs show (its schedule too)
    listed = sdqueue("runs")
    assert listed.returncode == 0, listed.stderr
    assert_inert(listed.stdout)
    assert "city\\x1b[31m-run\\r" in listed.stdout
    shown = sdqueue("runs", "show", run_name)
    assert shown.returncode == 0, shown.stderr
    assert_inert(shown.stdout)
    assert "run      city\\x1b[31m-run\\r  (from schedule night\\x1b[2Jly" in shown.stdout

    # keys list
    keys = sdqueue("keys", "list")
    assert keys.returncode == 0, keys.stderr
    assert_inert(keys.stdout)
    assert "ops\\x1b[2J\\rkey" in keys.stdout

    # top: the run in progress
    top = sdqueue("top", "--once")
    assert top.returncode == 0, top.stderr
    assert_inert(top.stdout)
    assert "city\\x1b[31m-run\\r" in top.stdout


def test_an_error_line_quoting_a_users_value_is_inert(tmp_path, capsys):
    from producer.cli import _fail

    assert _fail("no run named \x1b[2J\rstate succeeded", 3) == 3
    assert capsys.readouterr().err == "sdqueue: error: no run named \\x1b[2J\\rstate succeeded\n"

    # through the CLI: a schedules file whose own name holds an escape, and an unknown key
    path = tmp_path / "night\x1b[2J.toml"
    path.write_text("bogus = 1\n")
    result = sdqueue("schedules", "list", "--schedules", str(path))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("sdqueue: error: ")
    assert_inert(result.stderr)
    assert "night\\x1b[2J.toml" in result.stderr


def test_schedules_list_shows_a_path_with_escapes_inert(tmp_path):
    path = tmp_path / "schedules.toml"
    path.write_text('[[schedule]]\nname = "nightly"\ncron = "0 2 * * *"\n'
                    'manifest = "prompts/{date}\\u001b[2J\\r.jsonl"\n')
    result = sdqueue("schedules", "list", "--schedules", str(path))
    assert result.returncode == 0, result.stderr
    assert_inert(result.stdout)
    assert "manifest prompts/{date}\\x1b[2J\\r.jsonl" in result.stdout


def test_top_renders_a_workers_words_inert():
    import time

    from producer.top import render

    now = time.time()
    worker = {"name": "w\x1b[2J1", "host": "h\u202eost", "pid": 1, "started_at": now, "updated_at": now,
              "model": "tiny\rstate", "device": "cpu", "dtype": "fp32", "batching": "window", "loops": [],
              "running": [], "quarantined": None, "spool": None}
    frame = {"at": now, "queue": "q", "errors": {}, "workers": [worker], "queues": {"q": 0},
             "jobs": {"counts": {}, "oldest_queued_s": None}, "runs": []}
    text = "\n".join(render(frame, width=300))
    assert_inert(text)
    assert "w\\x1b[2J1  (host h\\u202eost" in text and "tiny\\rstate on cpu" in text


# --- 2. --rejects -----------------------------------------------------------------------------


def write_manifest(path: Path, bad: int = 1, pad: int = 0) -> Path:
    lines = [json.dumps(small(prompt="a lighthouse", seed=1))]
    lines += [json.dumps(small(prompt=f"bad row {i} " + "y" * pad, width=100)) for i in range(bad)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_rejects_never_overwrite_an_input_or_a_file_and_refuse_before_enqueueing(settings, client, enqueued, tmp_path):
    manifest = write_manifest(tmp_path / "rows.jsonl")
    original = manifest.read_bytes()
    (tmp_path / "link.jsonl").symlink_to(manifest)
    os.link(manifest, tmp_path / "hard.jsonl")
    existing = tmp_path / "rows.jsonl.rejects.jsonl"  # where the rejects go by default
    existing.write_text("keep me")
    link, hard, missing = tmp_path / "link.jsonl", tmp_path / "hard.jsonl", tmp_path / "missing" / "r.jsonl"
    cases: list[tuple[list[str], str]] = [
        (["--rejects", str(manifest)], f"output {str(manifest)!r} is the input {str(manifest)!r}"),
        (["--rejects", str(manifest), "--force"], f"output {str(manifest)!r} is the input"),
        (["--rejects", str(link), "--force"], f"output {str(link)!r} is the input"),
        (["--rejects", str(hard), "--force"], f"output {str(hard)!r} is the input"),
        ([], f"output {str(existing)!r} exists (--force writes over it)"),
        (["--rejects", str(tmp_path)], f"output {str(tmp_path)!r} is a folder"),
        (["--rejects", "/dev/full"], "output '/dev/full' is not a regular file"),
        (["--rejects", "/dev/full", "--force"], "output '/dev/full' is not a regular file"),
        (["--rejects", str(missing)], f"output {str(missing)!r}: its folder {str(missing.parent)!r} does not exist"),
    ]
    before, files = enqueued(), files_in(tmp_path)
    for extra, message in cases:
        name = f"rejects-{uuid.uuid4().hex[:8]}"
        result = sdqueue("run", str(manifest), "--name", name, "--skip-invalid", *extra)
        assert_one_line_refusal(result, f"sdqueue: error: {message}")
        assert enqueued() == before and files_in(tmp_path) == files
    assert manifest.read_bytes() == original and existing.read_text() == "keep me"

    # --force writes the rejects over the old file, whole, and the run goes ahead
    name = f"rejects-{uuid.uuid4().hex[:8]}"
    try:
        done = sdqueue("run", str(manifest), "--name", name, "--skip-invalid", "--force")
        assert done.returncode == 0, done.stderr
        [reject] = [json.loads(line) for line in existing.read_text().splitlines()]
        assert reject["line"] == 2 and files_in(tmp_path) == files  # no temporary file left
        assert manifest.read_bytes() == original
    finally:
        with client.db.session() as session:
            run_id = session.scalar(select(Run.id).where(Run.name == name))
            session.execute(delete(Job).where(Job.run_id == run_id))
            session.execute(delete(Run).where(Run.id == run_id))


def test_rejects_on_a_full_disk_are_one_line_and_nothing_is_enqueued(settings, enqueued, tmp_path, small_disk):
    disk = small_disk("64k")
    manifest = write_manifest(tmp_path / "rows.jsonl", bad=2000, pad=100)  # about 400 kB of rejects
    before = enqueued()
    result = sdqueue("run", str(manifest), "--name", f"full-{uuid.uuid4().hex[:8]}", "--skip-invalid",
                     "--rejects", str(disk / "rejects.jsonl"))
    assert result.returncode == 1 and "Traceback" not in result.stderr and result.stdout == ""
    assert result.stderr == f"sdqueue: error: cannot write {disk / 'rejects.jsonl'}: No space left on device\n"
    assert files_in(disk) == [] and enqueued() == before


# --- 3. fetch and export ------------------------------------------------------------------------


def test_fetch_writes_over_nothing_without_force_and_leaves_nothing_on_a_full_disk(client, rows, tmp_path,
                                                                                   small_disk):
    images = [os.urandom(150_000), os.urandom(150_000)]
    job_id = add_job(client, rows, images=images)
    out = tmp_path / "out"
    out.mkdir()
    (out / f"{job_id}-1.png").write_bytes(b"an older copy")
    refused = sdqueue("fetch", job_id, str(out))
    assert_one_line_refusal(refused, f"sdqueue: error: destination {str(out / f'{job_id}-1.png')!r} exists "
                                     "(--force writes over it)")
    assert files_in(out) == [f"{job_id}-1.png"] and (out / f"{job_id}-1.png").read_bytes() == b"an older copy"

    forced = sdqueue("fetch", job_id, str(out), "--force")
    assert forced.returncode == 0, forced.stderr
    assert [(out / f"{job_id}-{i}.png").read_bytes() for i in (0, 1)] == images
    assert files_in(out) == [f"{job_id}-0.png", f"{job_id}-1.png"]

    # a disk with room for one image: the first is written, the second fails, neither stays, nor the folder
    disk = small_disk("256k")
    full = sdqueue("fetch", job_id, str(disk / "sub" / "dir"))
    assert full.returncode == 1 and "Traceback" not in full.stderr and full.stdout == ""
    assert full.stderr == (f"sdqueue: error: cannot write {disk / 'sub' / 'dir' / f'{job_id}-1.png'}: No space left "
                           "on device; the images this fetch wrote were removed\n")
    assert files_in(disk) == []


def test_export_writes_over_nothing_without_force(client, settings, rows, tmp_path):
    images = [os.urandom(1000), os.urandom(1000)]
    name = f"export-{uuid.uuid4().hex[:8]}"
    run_id = add_run(client, rows, name)
    job_id = add_job(client, rows, images=images, run_id=run_id, run_key="row-0")
    dest = tmp_path / "folder"
    (dest / "images").mkdir(parents=True)
    (dest / "images" / f"{job_id}-1.png").write_bytes(b"keep me")

    refused = sdqueue("export", name, str(dest), "--format", "imagefolder", "--concurrency", "1")
    assert_one_line_refusal(refused, f"sdqueue: error: export to {dest} stopped: output "
                                     f"{str(dest / 'images' / f'{job_id}-1.png')!r} exists (--force writes over it); "
                                     "the files it wrote were removed")
    assert files_in(dest) == ["images", f"images/{job_id}-1.png"]  # image 0 was written, then removed
    assert (dest / "images" / f"{job_id}-1.png").read_bytes() == b"keep me"

    forced = sdqueue("export", name, str(dest), "--format", "imagefolder", "--force")
    assert forced.returncode == 0, forced.stderr
    assert [(dest / "images" / f"{job_id}-{i}.png").read_bytes() for i in (0, 1)] == images
    assert files_in(dest) == ["images", f"images/{job_id}-0.png", f"images/{job_id}-1.png", "metadata.jsonl"]
    assert oct((dest / "metadata.jsonl").stat().st_mode & 0o777) == oct(0o666 & ~_umask())

    # an earlier export: refused as before, and written over with --force
    again = sdqueue("export", name, str(dest), "--format", "imagefolder")
    assert_one_line_refusal(again, f"sdqueue: error: destination {dest} already holds an export (metadata.jsonl)")
    assert sdqueue("export", name, str(dest), "--format", "imagefolder", "--force").returncode == 0


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("format", ["imagefolder", "webdataset", "parquet", "hf"])
def test_export_on_a_full_disk_is_one_line_and_leaves_nothing(client, settings, rows, small_disk, format):
    images = [os.urandom(150_000), os.urandom(150_000)]
    name = f"export-{uuid.uuid4().hex[:8]}"
    run_id = add_run(client, rows, name)
    add_job(client, rows, images=images, run_id=run_id, run_key="row-0")
    disk = small_disk("256k")
    result = sdqueue("export", name, str(disk / "dataset"), "--format", format, "--shard-size", "1",
                     "--concurrency", "1")
    assert result.returncode == 1 and "Traceback" not in result.stderr and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith(f"sdqueue: error: export to {disk / 'dataset'} stopped: ")
    assert "No space left on device" in result.stderr and result.stderr.endswith("the files it wrote were removed\n")
    assert files_in(disk) == []


# --- 4. numbers -----------------------------------------------------------------------------


NUMBER_CASES = {
    "top --interval nan": (["top", "--once", "--interval", "nan"], "--interval"),
    "top --interval 0": (["top", "--interval", "0"], "--interval"),
    "top --interval -1": (["top", "--interval", "-1"], "--interval"),
    "sweep --orphan-grace nan": (["sweep", "--orphan-grace", "nan"], "--orphan-grace"),
    "sweep --orphan-grace inf": (["sweep", "--orphan-grace", "inf"], "--orphan-grace"),
    "sweep --orphan-grace -1": (["sweep", "--orphan-grace", "-1"], "--orphan-grace"),
    "wait --timeout -5": (["wait", "JOB", "--timeout", "-5"], "--timeout"),
    "wait --timeout nan": (["wait", "JOB", "--timeout", "nan"], "--timeout"),
    "wait --timeout inf": (["wait", "JOB", "--timeout", "inf"], "--timeout"),
    "submit --wait --timeout -5": (["submit", "--prompt", "a cat", "--wait", "--timeout", "-5"], "--timeout"),
    "submit --wait --timeout nan": (["submit", "--prompt", "a cat", "--wait", "--timeout", "nan"], "--timeout"),
    "runs show --interval nan": (["runs", "show", "RUN", "--watch", "--interval", "nan"], "--interval"),
    "runs show --interval 0": (["runs", "show", "RUN", "--watch", "--interval", "0"], "--interval"),
    "runs show --interval -2": (["runs", "show", "RUN", "--watch", "--interval", "-2"], "--interval"),
    "export --shard-size 0": (["export", "RUN", "DEST", "--format", "webdataset", "--shard-size", "0"], "--shard-size"),
    "export --concurrency 0": (["export", "RUN", "DEST", "--format", "parquet", "--concurrency", "0"], "--concurrency"),
    "export --concurrency 10**9": (["export", "RUN", "DEST", "--format", "parquet", "--concurrency", "1000000000"],
                                   "--concurrency"),
    "schedules list --count 0": (["schedules", "list", "--schedules", "F", "--count", "0"], "--count"),
    "schedules list --count 10**12": (["schedules", "list", "--schedules", "F", "--count", "10" * 6], "--count"),
    "worker --slots 0": (["worker", "--slots", "0"], "--slots"),
    "api --port 70000": (["api", "--port", "70000"], "--port"),
    "api --workers 0": (["api", "--workers", "0"], "--workers"),
    "models build-tiny --seed -1": (["models", "build-tiny", "DIR", "--seed", "-1"], "--seed"),
    "a number of 5,000 digits": (["export", "RUN", "DEST", "--format", "parquet", "--concurrency", "9" * 5000],
                                 "--concurrency"),
}


@pytest.mark.parametrize(("args", "option"), NUMBER_CASES.values(), ids=NUMBER_CASES.keys())
def test_a_number_option_out_of_bounds_is_a_usage_error(tmp_path, monkeypatch, capsys, args, option):
    monkeypatch.setenv("SDQUEUE_DATA_DIR", str(tmp_path))  # were it not refused, nothing lands in ~
    with pytest.raises(SystemExit) as refused:
        main(args)
    assert refused.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    (line,) = err.splitlines()  # one line: no usage first
    assert re.fullmatch(rf"sdqueue [a-z -]+: error: argument {option}: .{{1,80}}", line), line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args", [["sweep", "--orphan-grace", "nan"], ["top", "--once", "--interval", "nan"],
                                  ["wait", "JOB", "--timeout", "-5"]], ids=" ".join)
def test_the_issues_number_cases_through_the_real_cli(settings, args):
    result = sdqueue(*args)
    assert result.returncode == 2 and "Traceback" not in result.stderr and result.stdout == ""
    assert re.fullmatch(r"sdqueue [a-z]+: error: argument --[a-z-]+: '[-a-z0-9]+': must be a finite number .*",
                        result.stderr.splitlines()[-1]), result.stderr


@pytest.mark.parametrize(("option", "value"), [("--rate", "2147483648"), ("--max-queued", "2147483648"),
                                               ("--rate", "9" * 5000), ("--rate", "\u00b2"), ("--max-queued", "0")],
                         ids=["rate 2**31", "max-queued 2**31", "rate of 5,000 digits", "rate superscript 2",
                              "max-queued 0"])
def test_a_key_bound_the_column_cannot_hold_is_one_line_and_makes_no_key(settings, client, option, value):
    name = f"key-{uuid.uuid4().hex[:8]}"
    result = sdqueue("keys", "create", name, option, value)
    assert_one_line_refusal(result, f"sdqueue: error: {option}=")
    assert "2147483647" in result.stderr or "at least 1" in result.stderr or "from 1" in result.stderr
    assert "whsec_" not in result.stderr and "SQL" not in result.stderr
    with client.db.session() as session:
        assert session.scalar(select(func.count()).select_from(ApiKey).where(ApiKey.name == name)) == 0
    ok = sdqueue("keys", "create", name, option, "2147483647")  # the bound itself is taken
    assert ok.returncode == 0, ok.stderr
    with client.db.session() as session:
        session.execute(delete(ApiKey).where(ApiKey.name == name))


def test_a_database_error_never_quotes_its_parameters(settings, client):
    from sqlalchemy.exc import DBAPIError

    secret = "whsec_" + uuid.uuid4().hex
    with pytest.raises(DBAPIError) as raised, client.db.session() as session:
        session.add(ApiKey(id=str(uuid.uuid4()), name=f"key-{uuid.uuid4().hex[:8]}", token_sha256=uuid.uuid4().hex,
                           token_prefix="sdq_x", webhook_secret=secret, rate_per_minute=2**31))
    assert secret not in str(raised.value) and "hidden" in str(raised.value)
