"""S3 away: finished images wait in the bounded spool, the worker stops taking work when it is full,
and everything is uploaded when S3 returns, without denoising again. On a real, tiny filesystem:
a parcel that does not fit raises DiskFull and leaves nothing behind, and a disk short of space
counts as full until there is room again or S3 is back."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from models.constants import worker_queues
from models.jobs import Lease
from models.storage import S3Storage
from tests.conftest import counting_unet_calls, small, wait_for
from tests.servers import S3_ACCESS_KEY, S3_SECRET_KEY, SeaweedServer, s3_client
from worker.spool import DiskFull, Spool

TIMEOUT = 180
KIB = 1024
MIB = 1024 * KIB
DISK_TIMEOUT = 30  # the spool reads the disk about once a second


@pytest.fixture
def private_s3(tmp_path):  # type: ignore[no-untyped-def]
    with SeaweedServer(tmp_path / "s3") as server:
        s3_client(server.endpoint).create_bucket(Bucket="spool")
        yield server


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 2 MiB filesystem (tmpfs) to run out of."""
    folder = tmp_path / "disk"
    folder.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)],
                                 capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no `mount` command to make a small tmpfs with")
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here (needs root and CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", str(folder)], check=True)
            raise AssertionError(f"{folder} was still busy at unmount (a file left open?)")


@pytest.fixture
def s3_down(private_s3: SeaweedServer, monkeypatch: pytest.MonkeyPatch) -> S3Storage:
    """A store whose puts fail: its S3 server stopped (start it again with private_s3.start())."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY)
    private_s3.stop()
    return S3Storage("spool", "run", endpoint_url=private_s3.endpoint)


@pytest.fixture
def spool_on(tiny_disk: Path, s3_down: S3Storage) -> Iterator[Callable[..., Spool]]:
    """spool_on(min_free_bytes=...): a spool on the tiny disk whose store is down; stopped afterwards."""
    spools: list[Spool] = []

    def make(*, min_free_bytes: int, max_bytes: int = 2**30) -> Spool:
        spool = Spool.open(tiny_disk / "spool", max_bytes, s3_down, lambda lease: True, give_up_after=3600,
                           min_free_bytes=min_free_bytes)
        spools.append(spool)
        return spool

    yield make
    for spool in spools:
        spool.stop()


def parcel(job: int, sizes: list[int]) -> tuple[Lease, list[tuple[str, bytes]]]:
    return Lease(f"job-{job}", "test", 1), [(f"images/job-{job}/{i}.png", os.urandom(size)) for i, size in enumerate(sizes)]


def fill(path: Path, size: int) -> None:
    """Take `size` bytes of the disk (tmpfs keeps zeros too)."""
    path.write_bytes(bytes(size))


def messages(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "worker.spool" and text in r.getMessage()]


def test_a_parcel_that_does_not_fit_raises_disk_full_and_leaves_nothing_behind(tiny_disk, spool_on, caplog):
    caplog.set_level(logging.INFO, logger="worker.spool")
    spool = spool_on(min_free_bytes=0)  # no margin: the writes themselves run out of space
    fill(tiny_disk / "filler", 1 * MIB)
    handed_back: list[bool] = []
    added = 0
    with pytest.raises(DiskFull) as raised:
        for job in range(20):
            before = (spool.bytes, len(spool), shutil.disk_usage(tiny_disk).free)
            spool.add(*parcel(job, [100 * KIB] * 3), handed_back.append)
            added += 1
    # some parcels fit; the last one's first file did too, and its second was cut short
    assert added >= 1 and 100 * KIB < before[2] < 200 * KIB
    assert isinstance(raised.value.__cause__, OSError) and raised.value.__cause__.errno == errno.ENOSPC
    assert raised.value.errno == errno.ENOSPC and str(spool.folder) in str(raised.value)
    # the parcel is not kept, not counted, and every file it wrote (the half-written one too) is gone
    assert (spool.bytes, len(spool), shutil.disk_usage(tiny_disk).free) == before
    files = list(spool.folder.iterdir())
    assert len(files) == 3 * added and all(path.stat().st_size == 100 * KIB for path in files)
    assert sum(path.stat().st_size for path in files) == spool.bytes == 300 * KIB * added
    assert handed_back == []
    assert spool.full and spool.disk_full and spool.bytes < spool.max_bytes
    with pytest.raises(DiskFull):  # a second one in the same episode: logged once only
        spool.add(*parcel(99, [100 * KIB] * 3), handed_back.append)
    assert len(messages(caplog, "is out of space")) == 1 and not messages(caplog, "has room again")

    (tiny_disk / "filler").unlink()
    wait_for(lambda: not spool.full, timeout=DISK_TIMEOUT)
    assert not spool.disk_full and (spool.free_bytes or 0) > 900 * KIB
    assert len(messages(caplog, "has room again")) == 1
    spool.add(*parcel(100, [100 * KIB] * 3), handed_back.append)  # fits again
    assert len(spool) == added + 1 and not spool.full



def test_a_disk_short_of_the_margin_stops_batches_while_the_spool_is_in_use(tiny_disk, spool_on, caplog):
    caplog.set_level(logging.INFO, logger="worker.spool")
    spool = spool_on(min_free_bytes=1 * MIB)
    fill(tiny_disk / "filler", 1280 * KIB)
    # nothing waits for the store: a short disk alone does not stop a worker whose uploads work
    assert (spool.free_bytes or 0) < 1 * MIB and not spool.full and not spool.disk_full
    # already under the margin: refused before writing anything
    with pytest.raises(DiskFull) as raised:
        spool.add(*parcel(1, [100 * KIB]), lambda stored: None)
    assert raised.value.__cause__ is None and list(spool.folder.iterdir()) == [] and spool.bytes == 0
    assert spool.full and spool.disk_full
    (tiny_disk / "filler").unlink()
    wait_for(lambda: not spool.full, timeout=DISK_TIMEOUT)

    # in use, and then the disk runs short (another program fills it): full, far under max_bytes
    spool.add(*parcel(2, [300 * KIB]), lambda stored: None)
    assert not spool.full and len(spool) == 1
    fill(tiny_disk / "filler", 1 * MIB)
    wait_for(lambda: spool.full, timeout=DISK_TIMEOUT)
    assert spool.disk_full and spool.bytes == 300 * KIB < spool.max_bytes
    assert (spool.free_bytes or 0) < 1 * MIB
    (tiny_disk / "filler").unlink()
    wait_for(lambda: not spool.full, timeout=DISK_TIMEOUT)
    assert len(spool) == 1 and not spool.disk_full  # still waiting for the store, but room again
    assert len(messages(caplog, "below SDQUEUE_SPOOL_MIN_FREE_BYTES")) == 1
    assert len(messages(caplog, "is out of space")) == 1 and len(messages(caplog, "has room again")) == 2


def test_the_store_coming_back_ends_a_disk_full_episode(tiny_disk, spool_on, private_s3):
    spool = spool_on(min_free_bytes=0)
    fill(tiny_disk / "filler", 1900 * KIB)
    with pytest.raises(DiskFull):
        spool.add(*parcel(1, [300 * KIB]), lambda stored: None)
    assert spool.full and len(spool) == 0
    private_s3.start()
    # the disk is as short as before, but images go straight to the store again
    wait_for(lambda: not spool.full, timeout=TIMEOUT)
    assert not spool.disk_full and (spool.free_bytes or 0) < 300 * KIB


def test_images_wait_in_the_spool_while_s3_is_down(settings_env, private_s3, monkeypatch, tmp_path):
    from celery.contrib.testing.worker import start_worker

    from models.settings import load_settings
    from producer.client import Client
    from worker.app import configure
    from worker.tasks import generate, reset_context

    monkeypatch.setenv("SDQUEUE_STORAGE_URL", "s3://spool/run")
    monkeypatch.setenv("SDQUEUE_S3_ENDPOINT_URL", private_s3.endpoint)
    monkeypatch.setenv("SDQUEUE_PIXEL_BUDGET", str(256 * 256))  # one job per batch
    monkeypatch.setenv("SDQUEUE_SPOOL_MAX_BYTES", "1")  # full with the first job's images
    monkeypatch.setenv("SDQUEUE_SPOOL_DIR", str(tmp_path / "spool"))
    settings = load_settings()
    client = Client(settings)
    app = configure(settings)
    reset_context()
    engine = generate.context.engine
    try:
        with counting_unet_calls(engine) as calls, start_worker(
                app, pool="threads", concurrency=4, perform_ping_check=False, shutdown_timeout=120,
                queues=worker_queues(settings.queue, settings.model)):
            private_s3.stop()
            job_ids = [client.submit(small(prompt=f"a lighthouse {i}", seed=i, num_inference_steps=3)) for i in range(6)]
            wait_for(lambda: len(engine.spool), timeout=TIMEOUT)
            time.sleep(3.0)  # batches that ran while the first upload was failing land in the spool too
            denoised = len(calls)
            time.sleep(3.0)
            # the spool is full: no batch starts any more; what was denoised waits in it
            assert len(calls) == denoised < 18 and len(engine.spool) == denoised // 3
            assert {client.get(job_id)["state"] for job_id in job_ids} <= {"queued", "running"}  # none recorded
            private_s3.start()
            records = [client.wait(job_id, timeout=TIMEOUT) for job_id in job_ids]
    finally:
        reset_context()
        client.close()
    assert [r["state"] for r in records] == ["succeeded"] * 6
    assert len(calls) == 18  # each job denoised once: 3 steps each
    assert all(r["attempts"] == 1 for r in records)
    listed = s3_client(private_s3.endpoint).list_objects_v2(Bucket="spool", Prefix="run/images/")
    assert sorted(o["Key"] for o in listed["Contents"]) == sorted(f"run/{r['images'][0]['key']}" for r in records)
    assert list((tmp_path / "spool").rglob("*.part")) == []  # nothing left behind on disk
