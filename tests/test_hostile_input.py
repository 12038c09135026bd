"""Hostile input through the real CLI: an --image that is a device, a FIFO, a folder or too
large, and a fetch into something that is not a writable folder. Every refusal is one line on
stderr and exit 2, quickly, and nothing is written: no job row, no message, no object, no file."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from models.errors import InvalidRequest
from models.request import MAX_IMAGE_BYTES
from producer.cli import read_image_file
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
    import producer.cli

    bound = 64
    monkeypatch.setattr(producer.cli, "MAX_IMAGE_BYTES", bound)
    reads: list[int] = []
    real_read = os.read

    def counting_read(fd: int, n: int) -> bytes:
        data = real_read(fd, n)
        reads.append(len(data))
        return data

    monkeypatch.setattr(os, "read", counting_read)
    assert Path("/proc/self/maps").stat().st_size == 0
    too_large = f"file of more than {bound} bytes is larger than the bound of {bound} bytes"
    with pytest.raises(InvalidRequest, match=rf"^invalid request: image='/proc/self/maps': {too_large}$"):
        read_image_file(Path("/proc/self/maps"))
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

    # A writable folder still works, over an earlier copy, and leaves no temporary file behind.
    out = tmp_path / "out"
    out.mkdir()
    (out / f"{job_id}-0.png").write_bytes(b"an older copy")
    fetched = sdqueue("fetch", job_id, str(out))
    assert fetched.returncode == 0, fetched.stderr
    assert sorted(p.name for p in out.iterdir()) == [f"{job_id}-0.png", f"{job_id}-1.png"]
    assert (out / f"{job_id}-0.png").read_bytes().startswith(b"\x89PNG")


def test_fetch_of_a_job_that_has_not_succeeded_keeps_its_message(client, tmp_path):
    job_id = client.submit(small(prompt="a lighthouse"))  # no worker: it stays queued
    result = sdqueue("fetch", job_id, str(tmp_path / "out"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr == f"sdqueue: error: job {job_id} is queued: it has no images to fetch\n"
    assert not (tmp_path / "out").exists()
