"""The CLI through the HTTP API (SDQUEUE_API_URL, SDQUEUE_API_KEY; producer/remote.py), against a
real API on the real Redis, PostgreSQL and S3 server: the same output and exit codes as the local
commands, and no SQLAlchemy, Redis client or Celery loaded on the way."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Callable

import pytest

from producer import http
from producer.cli import main
from tests.conftest import wait_for
from tests.test_api import api, make_key  # noqa: F401  (fixtures)
from tests.test_http_client import no_key_state_left  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--width", "256", "--height", "256", "--num-inference-steps", "3"]
LOCAL = ("SDQUEUE_DATABASE_URL", "SDQUEUE_BROKER_URL", "SDQUEUE_STORAGE_URL", "SDQUEUE_S3_ENDPOINT_URL")


@pytest.fixture
def remote(api: str, make_key: Callable[..., str], monkeypatch: pytest.MonkeyPatch,
           capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    """`sdqueue ARGS` in this process with only the API's URL and a key: the database's, the
    broker's and storage's settings are gone (the API has its own, loaded before)."""
    token = make_key()
    monkeypatch.setenv("SDQUEUE_API_URL", api)
    monkeypatch.setenv("SDQUEUE_API_KEY", token)
    for name in LOCAL:
        monkeypatch.delenv(name, raising=False)

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_submit_wait_status_fetch_run_and_export(remote, worker, tmp_path):
    # 1. submit --wait: the job's lines as `sdqueue status` prints them, exit 0
    code, out, err = remote("submit", "--prompt", "a red bicycle", "--seed", "7", "--num-images", "2", *SMALL, "--wait")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[1].startswith("state    succeeded  (attempts 1, failures 0)") and "prompt   a red bicycle" in lines
    job_id = lines[0].split()[1]
    assert [line.split()[:3] for line in lines if line.startswith("image")] == [
        ["image", "0", "seed=7"], ["image", "1", "seed=8"]]
    assert f"{os.environ['SDQUEUE_API_URL']}/v1/jobs/{job_id}/images/0" in out
    # 2. status, and its JSON: the API's record
    assert remote("status", job_id)[1] == out
    code, out, _ = remote("status", job_id, "--json")
    record = json.loads(out)
    assert code == 0 and record["id"] == job_id and record["state"] == "succeeded" and "input_key" not in record
    # 3. fetch: the paths, one a line; again: refused (exit 2), the files kept
    code, out, err = remote("fetch", job_id, str(tmp_path / "out"))
    assert code == 0, err
    assert out.splitlines() == [str(tmp_path / "out" / f"{job_id}-{i}.png") for i in (0, 1)]
    code, _, err = remote("fetch", job_id, str(tmp_path / "out"))
    assert code == 2 and "exists (--force writes over it)" in err
    assert remote("fetch", job_id, str(tmp_path / "out"), "--force")[0] == 0
    # 4. a run from a manifest, followed until it ends, listed, shown, exported
    manifest = tmp_path / "run.jsonl"
    manifest.write_text(json.dumps({"prompt": "a blue kite", "seed": 3}) + "\n")
    name = f"kites-{uuid.uuid4().hex[:8]}"
    code, out, err = remote("run", str(manifest), "--name", name, *SMALL)
    assert code == 0, err
    assert out.startswith(f"run {name} created: 1 job(s) enqueued in ")
    with http.Client() as api:
        wait_for(lambda: api.run(name).finished, timeout=120, step=0.2)
    code, out, _ = remote("runs")
    assert code == 0 and out.splitlines()[0].split()[:3] == ["RUN", "PRIORITY", "CREATED"]
    assert out.splitlines()[1].split()[0] == name and out.splitlines()[1].split()[-3:-1] == ["0", "0"]
    code, out, _ = remote("runs", "show", name)
    assert code == 0 and out.splitlines()[1] == "jobs     1/1 ended: 0 queued, 0 running, 1 succeeded, 0 failed, 0 cancelled"
    assert "ETA done" in out
    code, out, err = remote("export", name, str(tmp_path / "dataset"), "--format", "imagefolder")
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "dataset" / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and (tmp_path / "dataset" / rows[0]["file_name"]).is_file()


def test_refusals_and_exit_codes(remote, tmp_path, monkeypatch):
    # bad input: the field and its bound, exit 2, nothing enqueued
    code, _, err = remote("submit", "--prompt", "a cat", "--width", "500")
    assert code == 2 and err.startswith("sdqueue: error: invalid request: width=500: ")
    code, _, err = remote("submit", "--prompt", "a cat", "--image", str(tmp_path))
    assert code == 2 and "image=" in err and "is a directory" in err
    # no such job or run: 3
    assert remote("status", str(uuid.uuid4()))[0] == 3
    assert remote("runs", "show", "no-such-run")[0] == 3
    # a queued job (no worker): wait times out (4), cancel (0), cancel again (1: it has ended)
    code, job_id, _ = remote("submit", "--prompt", "a snail", *SMALL)
    job_id = job_id.strip()
    assert code == 0 and uuid.UUID(job_id)
    code, _, err = remote("wait", job_id, "--timeout", "0.2")
    assert code == 4 and err.strip() == f"sdqueue: error: job {job_id} still queued after 0.2 s"
    assert remote("cancel", job_id)[1] == f"{job_id} cancelled\n"
    code, _, err = remote("cancel", job_id)
    assert code == 1 and f"job {job_id} is cancelled" in err
    code, out, _ = remote("wait", job_id, "--progress")
    assert code == 1 and "state    cancelled" in out
    code, _, err = remote("fetch", job_id, str(tmp_path / "none"))
    assert code == 1 and "it has no images to fetch" in err and not (tmp_path / "none").exists()
    # a run with bad rows: the rows named, exit 2; with --skip-invalid the rejects written
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"prompt": "bad", "width": 500}) + "\n")
    name = f"mixed-{uuid.uuid4().hex[:8]}"
    code, _, err = remote("run", str(manifest), "--name", name, *SMALL)
    assert code == 2 and "1 of 2 rows are invalid; nothing was enqueued (--skip-invalid" in err
    assert "line 2: width=500" in err
    code, out, err = remote("run", str(manifest), "--name", name, *SMALL, "--skip-invalid", "--json")
    assert code == 0, err
    assert json.loads(out)["inserted"] == 1 and "1 invalid row(s) skipped" in err
    assert json.loads(Path(f"{manifest}.rejects.jsonl").read_text())["line"] == 2
    assert remote("runs", "cancel", name)[1] == f"1 queued job(s) of run {name} cancelled\n"
    assert remote("runs", "retry", name)[1] == f"0 failed job(s) of run {name} queued again\n"
    code, _, err = remote("runs", "delete", name, "--yes")
    assert code == 2 and "the API does not offer it" in err
    # a key the API does not know: 1, and said so
    monkeypatch.setenv("SDQUEUE_API_KEY", "sdq_unknown")
    code, _, err = remote("status", job_id)
    assert code == 1 and "unknown or revoked API key (SDQUEUE_API_KEY was refused)" in err
    # a command that needs the database, with only the API's URL: one line, exit 1
    code, _, err = remote("top", "--once")
    assert code == 1 and err.startswith("sdqueue: error: sdqueue top works on the database and the broker directly")


def test_the_remote_path_loads_no_sqlalchemy_redis_or_celery(api, make_key):
    env = {k: v for k, v in os.environ.items() if k not in LOCAL}
    env.update(SDQUEUE_API_URL=api, SDQUEUE_API_KEY=make_key())
    probe = (
        "import sys\n"
        "from producer.cli import main\n"
        "assert main(['submit', '--prompt', 'a cat', '--width', '256', '--height', '256', '--json']) == 0\n"
        "assert main(['status', '00000000-0000-0000-0000-000000000000']) == 3\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'sqlalchemy', 'redis', 'celery', 'kombu', 'PIL', "
        "'numpy', 'torch', 'worker', 'pydantic', 'pydantic_settings', 'boto3', 'alembic'}))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT,
                            env=env)
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout[: result.stdout.rindex("}") + 1])
    assert record["state"] == "queued" and result.stdout.strip().endswith("[]"), result.stdout
    with http.Client(api, api_key=env["SDQUEUE_API_KEY"]) as sdq:
        sdq.cancel(record["id"])
