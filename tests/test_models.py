"""A job names its model; it goes to that model's queues, and only workers pinning that model run
it (models/registry.py, models/constants.py). A model no worker serves keeps its jobs queued."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import redis

from models.constants import queue_for
from models.errors import InvalidRequest
from models.request import parse_request
from producer.runs.manifest import load_manifest
from tests.conftest import small, wait_for
from tests.servers import stop_process_group

TIMEOUT = 240


def sdqueue(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "producer.cli", *args], capture_output=True, text=True,
                          timeout=TIMEOUT, env=env)


def test_two_worker_pools_each_run_the_jobs_of_their_model(settings, client, worker, tmp_path):
    from worker.tasks import generate

    tiny_worker = generate.context.engine.hostname  # the in-process worker pins tiny (SDQUEUE_MODEL)
    log = open(tmp_path / "standin.log", "wb")
    standin = subprocess.Popen([sys.executable, "-m", "producer.cli", "worker", "--model", "standin", "--loglevel",
                                "INFO"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                               env={**os.environ, "SDQUEUE_STANDIN_SCALE": "0"})
    try:
        by_model = {
            "tiny": [client.submit(small(prompt=f"a tiny fox {i}", seed=i)) for i in range(2)],
            "standin": [client.submit(small(prompt=f"a stand-in fox {i}", seed=i, model="standin"))
                        for i in range(2)],
        }
        cli = sdqueue("submit", "--prompt", "a stand-in boat", "--model", "standin", "--width", "256",
                      "--height", "256", "--num-inference-steps", "2")
        assert cli.returncode == 0, cli.stderr
        by_model["standin"].append(cli.stdout.strip())
        # no worker pins sd21-base here: its job waits, in its own queue
        waiting = client.submit(small(prompt="a sofa", model="sd21-base"))
        for model, ids in by_model.items():
            for job_id in ids:
                record = client.wait(job_id, timeout=TIMEOUT)
                assert record["state"] == "succeeded", (record, (tmp_path / "standin.log").read_text()[-3000:])
                assert record["model"] == model and record["params"]["model"] == model
                assert (record["worker"] == tiny_worker) == (model == "tiny"), record["worker"]
        assert client.get(waiting)["state"] == "queued" and client.get(waiting)["model"] == "sd21-base"
        broker = redis.Redis.from_url(settings.broker_url)
        try:
            queued = broker.lrange(queue_for(settings.queue, "interactive", "sd21-base"), 0, -1)
            assert [json.loads(m)["headers"]["id"] for m in queued] == [waiting]
        finally:
            broker.close()
        shown = json.loads(sdqueue("status", by_model["standin"][2], "--json").stdout)
        assert shown["model"] == "standin"
    finally:
        stop_process_group(standin, timeout=60)
        log.close()
        client.cancel(waiting)


@pytest.mark.parametrize(("model", "words"), [
    ("sd99", ["model='sd99'", "is not a registry model", "sd21-base", "sdqueue models list"]),
    ("/srv/models/mine", ["model='/srv/models/mine'", "registry models only", "SDQUEUE_MODEL_FOLDERS"]),
])
def test_an_unknown_model_is_refused_at_submit_naming_the_field_and_nothing_is_written(settings, trace, model,
                                                                                      words):
    before = trace()
    result = sdqueue("submit", "--prompt", "a cat", "--model", model)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    for word in words:
        assert word in result.stderr, result.stderr
    with pytest.raises(InvalidRequest, match="model="):
        parse_request({"prompt": "a cat", "model": model}, settings)
    assert trace() == before


def test_a_folder_is_a_model_only_under_the_allowed_folders(settings, tmp_path):
    allowed = tmp_path / "models"
    folder = allowed / "mine"
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "model_index.json").write_text("{}")
    open_settings = settings.model_copy(update={"model_folders": str(allowed)})
    request = parse_request({"prompt": "a cat", "model": str(folder)}, open_settings)
    assert request.model == str(folder.resolve())
    queue = queue_for("q", "interactive", request.model)
    assert queue.startswith("q.folder-") and len(queue) == len("q.folder-") + 12
    for bad, reason in ((outside, "outside SDQUEUE_MODEL_FOLDERS"), (allowed / "none", "no model_index.json")):
        with pytest.raises(InvalidRequest, match=reason):
            parse_request({"prompt": "a cat", "model": str(bad)}, open_settings)
    with pytest.raises(InvalidRequest, match="registry models only"):
        parse_request({"prompt": "a cat", "model": str(folder)}, settings)


def test_a_bad_default_model_is_named_as_the_setting(settings):
    with pytest.raises(InvalidRequest, match=r"SDQUEUE_DEFAULT_MODEL='nope'"):
        parse_request({"prompt": "a cat"}, settings.model_copy(update={"default_model": "nope"}))
    assert parse_request({"prompt": "a cat"}, settings).model == "tiny"  # SDQUEUE_MODEL's, when unset


def test_manifest_rows_and_the_api_refuse_an_unknown_model(settings, tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"prompt": "a fox"}\n{"prompt": "a cat", "model": "sd99"}\n{"prompt": "a dog", "model": "standin"}\n')
    manifest = load_manifest(path, settings=settings)
    assert [row.request.model for row in manifest.rows] == ["tiny", "standin"]
    assert manifest.rejects[0].line == 2 and "model='sd99'" in manifest.rejects[0].problems[0]
    from tests.test_api import serving

    with serving(settings.model_copy(update={"api_auth": "off"})) as url:
        answer = httpx.post(f"{url}/v1/jobs", json={"prompt": "a cat", "model": "sd99"}, timeout=30)
        assert answer.status_code == 422 and "model='sd99'" in answer.text, answer.text


def test_models_list_shows_each_entry_with_its_modes_size_and_inputs(settings):
    listed = sdqueue("models", "list")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["MODEL", "MODES", "SIZE", "WEIGHTS"]
    tiny = next(i for i, line in enumerate(lines) if line.startswith("tiny "))
    assert "txt2img,img2img" in lines[tiny] and "64px" in lines[tiny] and "(the default)" in lines[tiny]
    assert lines[tiny + 2].strip().startswith("inputs:")
    assert any(line.startswith("sd21-base ") and "stabilityai/stable-diffusion-2-1-base" in line for line in lines)


def test_parse_without_settings_takes_registry_names_only():
    assert parse_request({"prompt": "a cat"}).model is None  # filled in where the job's row is made
    assert parse_request({"prompt": "a cat", "model": "sd21-base"}).model == "sd21-base"
    with pytest.raises(InvalidRequest, match="registry models only"):
        parse_request({"prompt": "a cat", "model": str(Path.cwd())})
