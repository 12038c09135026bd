"""A fault of the host is never the job's: errors classified (worker/blame.py), a worker that sees
one quarantined until its probe passes (worker/quarantine.py), its jobs given back uncharged. A
real worker (in this process) on Redis, PostgreSQL and S3."""

from __future__ import annotations

import errno
import importlib
import sys

import pytest

from models.errors import JobError
from models.workers import list_workers
from tests.conftest import failing_unet, interactive_queue, small, wait_for

TIMEOUT = 180


def raised(action) -> BaseException:  # type: ignore[no-untyped-def]
    try:
        action()
    except BaseException as exc:  # noqa: BLE001
        return exc
    raise AssertionError("nothing raised")


def test_errors_of_the_host_are_told_from_errors_of_the_job(tmp_path, monkeypatch):
    from PIL import Image, UnidentifiedImageError

    from worker.blame import host_fault, signature

    # the host's: a broken image, the disk, the GPU
    assert "cannot be imported" in host_fault(raised(lambda: importlib.import_module("no_such_module_here")))
    (tmp_path / "breaks_on_import.py").write_text("raise AttributeError('half-installed package')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "while it was imported" in host_fault(raised(lambda: importlib.import_module("breaks_on_import")))
    assert "no space left" in host_fault(OSError(errno.ENOSPC, "No space left on device"))
    assert "GPU" in host_fault(RuntimeError("CUDA error: device-side assert triggered"))
    try:
        try:
            raise ModuleNotFoundError("No module named 'pyparsing'")
        except ImportError as exc:
            raise RuntimeError("Failed to import compel") from exc
    except RuntimeError as wrapped:
        assert "cannot be imported" in host_fault(wrapped)  # through what it was raised from
    # the job's, or nobody's known: charged as before
    assert host_fault(JobError("prompt 'a (' cannot be parsed by compel", "prompt-unparsable")) is None
    import io
    assert host_fault(raised(lambda: Image.open(io.BytesIO(b"not an image")))) is None
    assert isinstance(raised(lambda: Image.open(io.BytesIO(b"not an image"))), UnidentifiedImageError)
    assert host_fault(RuntimeError("the model cannot take this input")) is None
    assert host_fault(FileNotFoundError(errno.ENOENT, "no such file")) is None
    # the same error twice, whatever the job's own numbers
    assert signature(ValueError("step 3 of 25 failed")) == signature(ValueError("step 7 of 40 failed"))


def quarantine_of(settings):  # type: ignore[no-untyped-def]
    workers = list_workers(settings)
    return workers[0].get("quarantined") if workers else None


def test_a_gpu_fault_quarantines_the_worker_and_costs_the_job_nothing(settings, client, worker, monkeypatch):
    from worker.tasks import generate

    engine = generate.context.engine
    monkeypatch.setattr(engine.health, "probe_interval", 1.0)
    with failing_unet(lambda: RuntimeError("CUDA error: an illegal memory access was encountered (simulated)")) as gpu:
        job_id = client.submit(small(prompt="a lighthouse", seed=5))
        state = wait_for(lambda: quarantine_of(settings), timeout=TIMEOUT)
        assert "GPU" in state["reason"] and "illegal memory access" in state["reason"]
        assert engine.quarantined
        wait_for(lambda: gpu.raised >= 3, timeout=TIMEOUT)  # the fault, then probes that still fail
        record = client.get(job_id)
        assert record["state"] in ("queued", "running") and record["failures"] == 0, record
        gpu.on = False  # the host is mended: the next probe passes
        record = client.wait(job_id, timeout=TIMEOUT)
    assert record["state"] == "succeeded" and record["failures"] == 0 and record["attempts"] >= 2, record
    wait_for(lambda: not engine.quarantined and quarantine_of(settings) is None, timeout=TIMEOUT)


def test_a_broken_install_gives_compel_jobs_back_uncharged(settings, client, worker, monkeypatch):
    """As a module on the worker's path that cannot be imported would: compel's import fails."""
    from worker.tasks import generate

    engine = generate.context.engine
    monkeypatch.setattr(engine.health, "probe_interval", 1.0)
    monkeypatch.setitem(sys.modules, "compel", None)  # `import compel` raises ImportError
    ids = [client.submit(small(prompt=f"a ({word})++ boat", use_compel=True, seed=i))
           for i, word in enumerate(["red", "blue", "green"])]
    state = wait_for(lambda: quarantine_of(settings), timeout=TIMEOUT)
    assert "cannot be imported" in state["reason"]
    wait_for(lambda: engine.health.state is not None and engine.health.state.probes >= 1, timeout=TIMEOUT)
    assert all(client.get(job_id)["failures"] == 0 for job_id in ids)
    monkeypatch.delitem(sys.modules, "compel")  # mended
    records = [client.wait(job_id, timeout=TIMEOUT) for job_id in ids]
    assert all(r["state"] == "succeeded" and r["failures"] == 0 for r in records), records


@pytest.mark.parametrize("other_succeeds", [True, False])
def test_the_same_error_on_different_jobs_in_a_row_is_the_hosts_when_others_succeed(
        settings, client, worker, monkeypatch, other_succeeds):
    from models import jobs
    from worker.tasks import generate

    engine = generate.context.engine
    monkeypatch.setattr(engine.health, "probe_interval", 600.0)  # no probe during this test
    monkeypatch.setattr(engine.settings, "max_attempts", 1000)  # they fail again and again meanwhile
    if other_succeeds:  # another worker of this deployment recorded a job like these a moment ago
        import uuid

        from models.tables import Job

        done = str(uuid.uuid4())
        with client.db.session() as session:  # its row, as the producer writes it (no message: no one else runs it)
            session.add(Job(id=done, mode="txt2img", params=small(prompt="done elsewhere"), seed=1, width=256,
                            height=256, num_inference_steps=3, num_images=1, queue=interactive_queue(settings)))
        with client.db.session() as session:
            job, _ = jobs.claim(session, done, "other-worker", "tiny", lease_seconds=30, max_attempts=3)
            lease = jobs.lease_of(job)
        with client.db.session() as session:
            jobs.succeed(session, lease, [])
    ids: list[str] = []
    # an error nobody's known: charged, unless it repeats
    with failing_unet(lambda: ValueError("weights went bad at block 3")):
        ids = [client.submit(small(prompt=f"job {i}", seed=i)) for i in range(3)]  # three different jobs
        wait_for(lambda: engine.quarantined or all(client.get(i)["failures"] >= 1 for i in ids), timeout=TIMEOUT)
        if other_succeeds:
            state = wait_for(lambda: quarantine_of(settings), timeout=TIMEOUT)
            assert "3 different jobs in a row" in state["reason"]
            wait_for(lambda: all(client.get(i)["failures"] == 0 for i in ids), timeout=TIMEOUT)  # refunded
        else:  # nobody else succeeds with such jobs: it may be theirs; charged, not quarantined
            assert not engine.quarantined
            assert all(client.get(i)["failures"] >= 1 for i in ids)
    for job_id in ids:
        try:
            client.cancel(job_id)
        except Exception:  # it ended meanwhile
            pass


def broken_image_worker(tmp_path, pyparsing: str, **env: str):  # type: ignore[no-untyped-def]
    """`sdqueue worker` in its own process, a `pyparsing` of this source first on its path (compel
    imports it); returns (the process, its log file)."""
    import os
    import subprocess

    module = tmp_path / "image" / "pyparsing"
    module.mkdir(parents=True)
    (module / "__init__.py").write_text(pyparsing)
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log:
        worker = subprocess.Popen([sys.executable, "-m", "producer.cli", "worker", "--loglevel", "INFO"],
                                  env={**os.environ, "PYTHONPATH": str(module.parent), **env},
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return worker, log_path


def test_with_quarantine_exit_a_broken_worker_gives_back_and_exits_with_that_status(settings_env, client, tmp_path):
    """`sdqueue worker` whose image cannot import pyparsing (compel needs it), SDQUEUE_QUARANTINE_EXIT=3:
    the compel job goes back to its queue uncharged and the worker exits 3, for its orchestrator."""
    from tests.servers import stop_process_group

    worker, log_path = broken_image_worker(tmp_path, "raise ImportError('a broken image: pyparsing (test)')\n",
                                           SDQUEUE_QUARANTINE_EXIT="3")
    try:
        job_id = client.submit(small(prompt="a (red)++ kite", use_compel=True, seed=3))
        assert worker.wait(timeout=TIMEOUT) == 3, log_path.read_text()[-3000:]
    finally:
        if worker.poll() is None:
            stop_process_group(worker, timeout=60)
    text = log_path.read_text()
    assert "quarantined: a module cannot be imported" in text and "exits with status 3" in text
    record = client.get(job_id)
    assert record["state"] == "queued" and record["failures"] == 0 and record["attempts"] == 1, record
    client.cancel(job_id)


MENDABLE_PYPARSING = '''
"""A broken image while FLAG exists; the real pyparsing once it is gone (the host mended)."""
import importlib, os, sys

FLAG = {flag!r}
if os.path.exists(FLAG):
    raise ImportError("a broken image: pyparsing (test)")
here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
del sys.modules[__name__]
sys.modules[__name__] = importlib.import_module(__name__)
'''


def test_a_quarantined_worker_stops_consuming_and_takes_work_again_once_its_probe_passes(
        settings_env, client, tmp_path):
    """`sdqueue worker` as deployed, its image broken (compel cannot import pyparsing), then mended."""
    from tests.servers import stop_process_group

    flag = tmp_path / "broken"
    flag.touch()
    worker, log_path = broken_image_worker(tmp_path, MENDABLE_PYPARSING.format(flag=str(flag)),
                                           SDQUEUE_PROBE_INTERVAL="1")
    try:
        job_id = client.submit(small(prompt="a (green)++ kite", use_compel=True, seed=4))
        wait_for(lambda: "Canceling queue" in log_path.read_text(), timeout=TIMEOUT)  # it stopped consuming
        assert "quarantined: a module cannot be imported" in log_path.read_text()
        wait_for(lambda: "probe 1 failed" in log_path.read_text(), timeout=TIMEOUT)
        assert client.get(job_id)["failures"] == 0
        flag.unlink()  # mended: the next probe passes, and it consumes again
        record = client.wait(job_id, timeout=TIMEOUT)
        text = log_path.read_text()
        assert "quarantine over" in text and "Started consuming from" in text, text[-3000:]
        assert record["state"] == "succeeded" and record["failures"] == 0, record
    finally:
        stop_process_group(worker, timeout=60)
