"""`sdqueue worker` as a user runs it: its own process (prefork pool), Redis, PostgreSQL, S3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from tests.servers import stop_process_group

TIMEOUT = 240


def sdqueue(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "producer.cli", *args], capture_output=True, text=True,
                          timeout=TIMEOUT)


def test_worker_process_serves_cli_jobs(settings_env, tmp_path):
    log = open(tmp_path / "worker.log", "wb")
    env = {**os.environ, "SDQUEUE_TORCH_THREADS": "1"}
    worker = subprocess.Popen([sys.executable, "-m", "producer.cli", "worker", "--loglevel", "INFO"],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        ids = []
        for args in (["--num-images", "2", "--seed", "100"], ["--use-compel", "--prompt", "a (blue)++ house"]):
            prompt = [] if "--prompt" in args else ["--prompt", "a small boat"]
            result = sdqueue("submit", *prompt, "--width", "256", "--height", "256", "--num-inference-steps", "2",
                             *args)
            assert result.returncode == 0, result.stderr
            ids.append(result.stdout.strip())
        for job_id in ids:
            waited = sdqueue("wait", job_id, "--timeout", str(TIMEOUT), "--json")
            assert waited.returncode == 0, (waited.stdout, waited.stderr, (tmp_path / "worker.log").read_text()[-3000:])
        first = json.loads(sdqueue("status", ids[0], "--json").stdout)
        assert [i["seed"] for i in first["images"]] == [100, 101]
        assert first["worker"] and first["attempts"] == 1
        fetched = sdqueue("fetch", ids[1], str(tmp_path / "out"))
        assert fetched.returncode == 0 and len(list((tmp_path / "out").glob("*.png"))) == 1
    finally:
        stop_process_group(worker, timeout=60)  # SIGTERM: Celery's warm shutdown
        log.close()
    text = (tmp_path / "worker.log").read_text()
    assert "RANDOM weights" in text  # the tiny model never runs unannounced
    assert "torch threads: 1 (SDQUEUE_TORCH_THREADS=1)" in text  # set before the model loaded


def test_worker_refuses_memory_broker_and_unbuilt_model(settings_env, tmp_path):
    env = {**os.environ, "SDQUEUE_BROKER_URL": "memory://"}
    result = subprocess.run([sys.executable, "-m", "producer.cli", "worker"], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 1 and "a worker needs a real broker" in result.stderr
    env = {**os.environ, "SDQUEUE_DATA_DIR": str(tmp_path)}
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "producer.cli", "worker", "--model", "sd21-arch"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1, result.stderr
    assert "model 'sd21-arch' is not built yet: run `sdqueue models build-arch`" in result.stderr
    assert time.monotonic() - start < 120
