"""Hostile input through the real CLI: an --image that is a device, a FIFO, a folder or too
large, and a fetch into something that is not a writable folder. Every refusal is one line on
stderr and exit 2, quickly, and nothing is written: no job row, no message, no object, no file."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from models.errors import InvalidRequest
from models.request import MAX_IMAGE_BYTES
from producer.files import read_image_file
from tests.conftest import small

TIMEOUT = 180


def sdqueue(*args: str) -> subprocess.CompletedProcess:
    # The timeout is the test of the FIFO: a CLI that blocks opening it fails here instead of hanging.
    return subprocess.run([sys.executable, "-m", "producer.cli", *args], capture_output=True, text=True, timeout=60)


def assert_one_line_refusal(result: subprocess.CompletedProcess, starts: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith(starts), result.stderr




# --- submit --image -------------------------------------------------------------------------


def _fifo(tmp_path: Path) -> Path:
    os.mkfifo(tmp_path / "fifo")
    return tmp_path / "fifo"


def _too_large(tmp_path: Path) -> Path:
    with open(tmp_path / "huge.png", "wb") as f:
        f.truncate(MAX_IMAGE_BYTES + 1)  # sparse: costs no disk
    return tmp_path / "huge.png"


def _link_to_zero(tmp_path: Path) -> Path:
    (tmp_path / "innocent.png").symlink_to("/dev/zero")
    return tmp_path / "innocent.png"


IMAGE_CASES = {
    "/dev/zero": (lambda tmp_path: Path("/dev/zero"), "is a character device, not a regular file"),
    "/dev/null": (lambda tmp_path: Path("/dev/null"), "is a character device, not a regular file"),
    "symlink to /dev/zero": (_link_to_zero, "is a character device, not a regular file"),
    "FIFO": (_fifo, "is a FIFO, not a regular file"),
    "directory": (lambda tmp_path: tmp_path, "is a directory, not a regular file"),
    "larger than the bound": (
        _too_large, f"file of {MAX_IMAGE_BYTES + 1} bytes is larger than the bound of {MAX_IMAGE_BYTES} bytes"),
    "missing": (lambda tmp_path: tmp_path / "missing.png", "cannot be read (No such file or directory)"),
}


@pytest.mark.parametrize(("make", "words"), IMAGE_CASES.values(), ids=IMAGE_CASES.keys())
def test_submit_image_that_is_not_a_regular_file_within_the_bound_is_one_line(settings, trace, tmp_path, make, words):
    path = make(tmp_path)
    before = trace()
    result = sdqueue("submit", "--prompt", "a cat", "--image", str(path))
    assert_one_line_refusal(result, f"sdqueue: error: invalid request: image={str(path)!r}: ")
    assert words in result.stderr, result.stderr
    assert trace() == before


def test_image_file_larger_than_its_size_says_is_read_only_to_the_bound(monkeypatch):
    # /proc files report a size of 0 and can be longer: only one byte past the bound is ever read.
    bound = 64
    reads: list[int] = []
    real_read = os.read

    def counting_read(fd: int, n: int) -> bytes:
        data = real_read(fd, n)
        reads.append(len(data))
        return data

    monkeypatch.setattr(os, "read", counting_read)
    assert Path("/proc/self/maps").stat().st_size == 0
    too_large = f"file of more than {bound} bytes is larger than the bound of {bound} bytes \\({bound} bytes\\)"
    with pytest.raises(InvalidRequest, match=rf"^invalid request: image='/proc/self/maps': {too_large}$"):
        read_image_file(Path("/proc/self/maps"), bound)
    assert sum(reads) == bound + 1


def test_image_file_within_the_bound_is_read_whole(tmp_path, png_bytes):
    data = png_bytes()
    (tmp_path / "in.png").write_bytes(data)
    assert read_image_file(tmp_path / "in.png") == data
    (tmp_path / "limit.bin").write_bytes(b"x" * MAX_IMAGE_BYTES)
    assert len(read_image_file(tmp_path / "limit.bin")) == MAX_IMAGE_BYTES


# --- fetch ----------------------------------------------------------------------------------


def test_fetch_into_what_is_not_a_writable_folder_is_one_line_and_writes_nothing(client, worker, tmp_path):
    job_id = client.submit(small(prompt="a lighthouse", num_images=2, seed=3))
    record = client.wait(job_id, timeout=TIMEOUT)
    assert record["state"] == "succeeded", record["error"]

    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    taken = tmp_path / "taken"
    (taken / f"{job_id}-1.png").mkdir(parents=True)  # where an image would go is a folder
    cases = [
        (a_file, f"destination {str(a_file)!r} exists and is not a folder"),
        (Path("/dev/null"), "destination '/dev/null' exists and is not a folder"),
        (a_file / "sub", f"destination {str(a_file / 'sub')!r} cannot be created (Not a directory)"),
        (Path("/etc/passwd/sub"), "destination '/etc/passwd/sub' cannot be created (Not a directory)"),
        (taken, f"destination {str(taken / f'{job_id}-1.png')!r} exists and is not a regular file"),
    ]
    before = sorted(tmp_path.rglob("*"))
    for dest, message in cases:
        result = sdqueue("fetch", job_id, str(dest))
        assert_one_line_refusal(result, f"sdqueue: error: {message}")
        assert result.stderr == f"sdqueue: error: {message}\n"
        with pytest.raises(ValueError, match=re.escape(message)):
            client.fetch(job_id, dest)
    assert sorted(tmp_path.rglob("*")) == before  # no image, no temporary file, no folder
    assert a_file.read_text() == "keep me"

    # A writable folder still works, over an earlier copy with --force only, and leaves no temporary file behind.
    out = tmp_path / "out"
    out.mkdir()
    (out / f"{job_id}-0.png").write_bytes(b"an older copy")
    kept = sdqueue("fetch", job_id, str(out))
    assert_one_line_refusal(kept, f"sdqueue: error: destination {str(out / f'{job_id}-0.png')!r} exists "
                                  "(--force writes over it)")
    assert sorted(p.name for p in out.iterdir()) == [f"{job_id}-0.png"]
    fetched = sdqueue("fetch", job_id, str(out), "--force")
    assert fetched.returncode == 0, fetched.stderr
    assert sorted(p.name for p in out.iterdir()) == [f"{job_id}-0.png", f"{job_id}-1.png"]
    assert (out / f"{job_id}-0.png").read_bytes().startswith(b"\x89PNG")


def test_fetch_of_a_job_that_has_not_succeeded_keeps_its_message(client, tmp_path):
    job_id = client.submit(small(prompt="a lighthouse"))  # no worker: it stays queued
    result = sdqueue("fetch", job_id, str(tmp_path / "out"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr == f"sdqueue: error: job {job_id} is queued: it has no images to fetch\n"
    assert not (tmp_path / "out").exists()


# --- bounded reads: manifests, grids, schedules -------------------------------------------------


def _counts(settings) -> tuple[int, int, int]:  # type: ignore[no-untyped-def]
    """Runs, job rows and bulk messages: what a refused `sdqueue run` could have left."""
    import redis
    from sqlalchemy import func, select

    from models.constants import queue_for
    from models.db import Database
    from models.tables import Job, Run

    db = Database(settings.database_url)
    broker = redis.Redis.from_url(settings.broker_url)
    try:
        with db.session() as session:
            runs = session.scalar(select(func.count()).select_from(Run)) or 0
            jobs = session.scalar(select(func.count()).select_from(Job)) or 0
        return runs, jobs, broker.llen(queue_for(settings.queue, "bulk", settings.default_model))
    finally:
        db.dispose()
        broker.close()


def _sparse(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)  # costs no disk
    return path


def _nested_toml(path: Path, depth: int = 5000) -> Path:
    path.write_text("x = " + "[" * depth + "]" * depth + "\n")
    return path


def _link(path: Path, target: str) -> Path:
    path.symlink_to(target)
    return path


def _fifo_named(path: Path) -> Path:
    os.mkfifo(path)
    return path


MANIFEST_CASES = {
    "/dev/zero as a manifest": (lambda d: _link(d / "m.jsonl", "/dev/zero"), "is a character device, not a regular file"),
    "a FIFO": (lambda d: _fifo_named(d / "m.csv"), "is a FIFO, not a regular file"),
    "a folder": (lambda d: (d / "m.parquet").mkdir() or d / "m.parquet", "is a directory, not a regular file"),
    "4 GiB and one byte": (lambda d: _sparse(d / "m.jsonl", (4 << 30) + 1),
                           f"file of {(4 << 30) + 1} bytes is larger than the bound of {4 << 30} bytes (4 GiB)"),
    "a grid past its bound": (lambda d: _sparse(d / "g.toml", (1 << 20) + 1), "larger than the bound of 1048576 bytes"),
    "a grid nested 5,000 deep": (lambda d: _nested_toml(d / "g.toml"), "nested deeper than the bound of 16 levels"),
    "a grid not UTF-8": (lambda d: (d / "g.toml").write_bytes(b"prompts = ['\xff']") and d / "g.toml", "not UTF-8"),
}


@pytest.mark.parametrize(("make", "words"), MANIFEST_CASES.values(), ids=MANIFEST_CASES.keys())
def test_a_manifest_that_cannot_be_read_within_its_bounds_is_one_line(settings, tmp_path, make, words):
    path = make(tmp_path)
    before = _counts(settings)
    result = sdqueue("run", str(path), "--name", "never")
    assert_one_line_refusal(result, f"sdqueue: error: {path}: ")
    assert words in result.stderr, result.stderr
    assert _counts(settings) == before


SCHEDULES_CASES = {
    "/dev/zero": (lambda d: Path("/dev/zero"), "is a character device, not a regular file"),
    "a FIFO": (lambda d: _fifo_named(d / "beat.toml"), "is a FIFO, not a regular file"),
    "a folder": (lambda d: d, "is a directory, not a regular file"),
    "past the bound": (lambda d: _sparse(d / "beat.toml", (1 << 20) + 1), "larger than the bound of 1048576 bytes"),
    "nested 5,000 deep": (lambda d: _nested_toml(d / "beat.toml"), "nested deeper than the bound of 16 levels"),
}


@pytest.mark.parametrize(("make", "words"), SCHEDULES_CASES.values(), ids=SCHEDULES_CASES.keys())
@pytest.mark.parametrize("command", [["schedules", "list"], ["beat"]])
def test_a_schedules_file_that_cannot_be_read_within_its_bound_is_one_line(settings, tmp_path, make, words, command):
    path = make(tmp_path)
    result = sdqueue(*command, "--schedules", str(path))
    assert_one_line_refusal(result, f"sdqueue: error: schedules file {str(path)!r} ")
    assert words in result.stderr, result.stderr


def test_a_line_past_its_bound_is_a_bad_row_never_held(tmp_path):
    from producer.runs.manifest import MAX_LINE_BYTES, load_manifest

    path = tmp_path / "m.jsonl"
    path.write_text('{"prompt": "a cat"}\n{"prompt": "' + "x" * MAX_LINE_BYTES + '"}\n{"prompt": "a dog"}\n')
    manifest = load_manifest(path)
    assert [row.request.prompt for row in manifest.rows] == ["a cat", "a dog"]
    (reject,) = manifest.rejects
    assert reject.line == 2 and reject.problems == [
        f"not a JSON object: line 2 is longer than the bound of {MAX_LINE_BYTES} bytes (1 MiB)"]


MEMORY = """
import json, resource, sys
from pathlib import Path
import producer.runs.manifest as manifests

manifests.SPILL_KEYS = 1000  # keys past these go to disk, as past 200,000 in use
path = Path(sys.argv[1])
with path.open("w") as out:
    for i in range(int(sys.argv[2])):
        out.write(json.dumps({"prompt": f"a lighthouse number {i}, " + "at dusk " * 10, "seed": i}) + "\\n")
manifest = manifests.load_manifest(path)
assert len(manifest.rows) == sum(1 for _ in manifest.rows) == int(sys.argv[2])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def test_memory_stays_flat_in_a_manifests_length(tmp_path):
    # Both passes (validate, then read again to write) over 5,000 and 50,000 rows: the peak is the
    # same within a few MB (held whole, 50,000 validated rows took about 60 MB more).
    def peak(rows: int) -> int:
        result = subprocess.run([sys.executable, "-c", MEMORY, str(tmp_path / f"{rows}.jsonl"), str(rows)],
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr
        return int(result.stdout)

    small_mb, large_mb = peak(5_000), peak(50_000)
    assert large_mb - small_mb < 12, (small_mb, large_mb)


# --- text a database or a terminal cannot hold ---------------------------------------------------


def test_a_nul_in_a_manifest_key_is_a_bad_row_before_anything_is_written(settings, tmp_path):
    rows = [{"prompt": f"a fox {i}", "key": f"fox-{i}"} for i in range(5)] + [{"prompt": "x", "key": "a\u0000b"}]
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    before = _counts(settings)
    result = sdqueue("run", str(path), "--name", "nul-key")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "line 6: key='a\\x00b': must not hold control characters: NUL (U+0000) at character 2" in result.stderr
    assert _counts(settings) == before
    # Skipping it, the run is made and sealed, and running it again finds nothing to do.
    for again in ([], ["--force"]):  # the second writes over the first's rejects file
        result = sdqueue("run", str(path), "--name", "nul-key", "--skip-invalid", "--json", *again)
        assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["existing"] == 5
    assert _counts(settings)[:2] == (before[0] + 1, before[1] + 5)
    assert "a\\u0000b" in (tmp_path / "m.jsonl.rejects.jsonl").read_text()


@pytest.mark.parametrize(("option", "value", "words"), [
    ("--prompt", "\x1b[2J\rstate    succeeded", "prompt='\\x1b[2J\\rstate    succeeded': must not hold control "
                                                "characters: escape (U+001B) at character 1"),
    # A command line cannot hold NUL (the manifest and API tests send it); C1's CSI is ESC [ in one byte.
    ("--negative-prompt", "a\x9b2Jb", "negative_prompt='a\\x9b2Jb': must not hold control characters: control "
                                      "character U+009B at character 2"),
    ("--guidance-scale", "nan", "guidance_scale=nan: input should be a finite number"),
    ("--strength", "inf", "strength=inf: input should be a finite number"),
])
def test_text_and_numbers_nothing_can_hold_are_refused_at_submit(settings, trace, option, value, words):
    before = trace()
    args = ["submit", *(["--prompt", "a cat"] if option != "--prompt" else []), option, value]
    result = sdqueue(*args)
    assert_one_line_refusal(result, "sdqueue: error: invalid request: ")
    assert words in result.stderr, result.stderr
    assert trace() == before


# --- a run's identity ---------------------------------------------------------------------------


def test_a_run_name_used_again_for_another_source_or_defaults_is_refused(settings, tmp_path):
    first, other = tmp_path / "first.jsonl", tmp_path / "other.jsonl"
    first.write_text("".join(json.dumps({"prompt": f"a boat {i}"}) + "\n" for i in range(4)))
    other.write_text("".join(json.dumps({"prompt": f"a car {i}"}) + "\n" for i in range(3)))
    assert sdqueue("run", str(first), "--name", "same", "--num-inference-steps", "30").returncode == 0
    before = _counts(settings)

    result = sdqueue("run", str(other), "--name", "same", "--num-inference-steps", "30")
    assert_one_line_refusal(result, "sdqueue: error: run 'same' exists and its source was ")
    assert f"{first} (sha256 " in result.stderr and f"this is {other} (sha256 " in result.stderr
    assert result.stderr.rstrip().endswith("give another --name, or --append to add these rows to it")

    result = sdqueue("run", str(first), "--name", "same")  # the option forgotten
    assert_one_line_refusal(result, "sdqueue: error: run 'same' exists and its defaults were "
                                    "--num-inference-steps 30, these are none: ")
    assert _counts(settings) == before

    # The same command again resumes (nothing to do); --append adds the other rows knowingly.
    assert sdqueue("run", str(first), "--name", "same", "--num-inference-steps", "30").returncode == 0
    assert _counts(settings) == before
    result = sdqueue("run", str(other), "--name", "same", "--num-inference-steps", "30", "--append", "--json")
    assert result.returncode == 0 and json.loads(result.stdout)["inserted"] == 3
    assert _counts(settings)[1] == before[1] + 3


def test_a_runs_jobs_can_be_cancelled_by_state_and_the_run_deleted_with_its_objects(settings, client, tmp_path,
                                                                                   png_bytes):
    from sqlalchemy import select, update

    from models.tables import Job, Run

    (tmp_path / "in.png").write_bytes(png_bytes())
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"a hut {i}", "image": "in.png", **small()}) + "\n" for i in range(6)))
    assert sdqueue("run", str(path), "--name", "to-delete").returncode == 0
    with client.db.session() as session:
        run_id = session.scalar(select(Run.id).where(Run.name == "to-delete"))
        ids = sorted(session.scalars(select(Job.id).where(Job.run_id == run_id)))
        keys = list(session.scalars(select(Job.input_key).where(Job.run_id == run_id)))
        # Two of them as a worker holds them.
        session.execute(update(Job).where(Job.id.in_(ids[:2])).values(state="running", attempts=1))
    assert all(client.storage.exists(key) for key in keys)

    result = sdqueue("runs", "delete", "to-delete", "--yes")
    assert result.returncode == 1 and result.stderr == (
        "sdqueue: error: run 'to-delete' has 6 queued or running job(s): cancel them first "
        "(sdqueue runs cancel to-delete --state all)\n")
    result = sdqueue("runs", "cancel", "to-delete", "--state", "running")
    assert result.returncode == 0 and result.stdout == "2 running job(s) of run to-delete cancelled\n"
    result = sdqueue("runs", "cancel", "to-delete", "--state", "all")
    assert result.returncode == 0 and result.stdout == "4 job(s) of run to-delete cancelled\n"

    # Not on a terminal, it asks for --yes rather than deleting unasked.
    result = sdqueue("runs", "delete", "to-delete")
    assert_one_line_refusal(result, "sdqueue: error: deleting run 'to-delete' (6 job(s), 0 image(s) and 6 object(s)) "
                                    "needs a confirmation: --yes")
    result = sdqueue("runs", "delete", "to-delete", "--yes")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "run to-delete deleted: 6 job(s), 0 image(s), 6 object(s)\n"
    with client.db.session() as session:
        assert session.scalar(select(Run.id).where(Run.name == "to-delete")) is None
        assert not list(session.scalars(select(Job.id).where(Job.id.in_(ids))))
    assert not any(client.storage.exists(key) for key in keys)
    assert sdqueue("runs", "show", "to-delete").returncode == 3


def _parquet_cases(tmp_path: Path) -> list[Path]:
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["a cat"] * 100, "width": [512] * 100}), tmp_path / "good.parquet")
    data = (tmp_path / "good.parquet").read_bytes()
    cases = {"truncated": data[: len(data) // 2], "random": b"PAR1" + random.Random(0).randbytes(5000) + b"PAR1",
             "footer-lies": data[:-8] + (2**31 - 1).to_bytes(4, "little") + b"PAR1"}
    flips = random.Random(1)
    for i in range(6):
        damaged = bytearray(data)
        for _ in range(10):
            damaged[flips.randrange(len(damaged))] = flips.randrange(256)
        cases[f"flipped-{i}"] = bytes(damaged)
    for name, content in cases.items():
        (tmp_path / f"{name}.parquet").write_bytes(content)
    return [tmp_path / f"{name}.parquet" for name in cases]


def test_a_damaged_parquet_manifest_is_refused_with_exit_2_every_time(settings, tmp_path):
    from producer.runs.manifest import ManifestError, load_manifest

    before = _counts(settings)
    for path in _parquet_cases(tmp_path):
        try:
            load_manifest(path)
        except ManifestError:
            pass
        else:
            continue  # a flip that left a readable file: its rows are validated like any others
        result = sdqueue("run", str(path), "--name", "damaged")  # the abort (exit 134) was at exit, sometimes
        assert_one_line_refusal(result, f"sdqueue: error: {path}: not a Parquet file (")
    assert _counts(settings) == before
