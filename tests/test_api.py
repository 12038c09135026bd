"""The HTTP API, served by uvicorn on loopback, against the real Redis, PostgreSQL and S3 server:
submit (JSON, multipart img2img, batches), follow events, fetch images, cancel; keys, limits,
idempotency; and every refusal (400, 401, 404, 409, 413, 422, 429, 503)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import httpx
import pytest

from tests.conftest import small, wait_for
from tests.servers import free_port

TIMEOUT = 120


@contextmanager
def serving(settings: Any) -> Iterator[str]:
    """The app of `settings` under uvicorn in a thread, on a free port; yields its base URL."""
    import uvicorn

    from producer.api import create_app

    port = free_port()
    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning", ws="none",
                            lifespan="on", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started or not thread.is_alive(), timeout=30)
        assert server.started, "the API did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


@pytest.fixture
def api(settings: Any) -> Iterator[str]:
    with serving(settings) as url:
        yield url


@pytest.fixture
def make_key(settings: Any, capsys: pytest.CaptureFixture[str]) -> Callable[..., str]:
    """`sdqueue keys create NAME [options]` through the CLI; returns the token it printed."""
    from producer.cli import main

    def make(*options: str, name: str | None = None) -> str:
        name = name or f"key-{os.urandom(4).hex()}"
        capsys.readouterr()
        assert main(["keys", "create", name, *options]) == 0
        printed = capsys.readouterr().out
        token = re.search(r"^token\s+(sdq_\S+)$", printed, re.M)
        assert token and re.search(r"^webhook secret\s+whsec_\S+$", printed, re.M), printed
        return token.group(1)

    return make


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def sse(response: httpx.Response) -> Iterator[tuple[str, Any]]:
    """Server-Sent Events as (event, data); comments (keep-alives) skipped."""
    event, data = None, []
    for line in response.iter_lines():
        if line == "":
            if event or data:
                yield event or "message", json.loads("\n".join(data)) if data else None
            event, data = None, []
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())


def job_count(settings: Any) -> int:
    from sqlalchemy import create_engine, func, select

    from models.db import normalize_url
    from models.tables import Job

    engine = create_engine(normalize_url(settings.database_url))
    try:
        with engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(Job)).scalar_one()
    finally:
        engine.dispose()


# -- the happy path --------------------------------------------------------------------------------

def test_submit_follow_fetch_and_img2img(api, make_key, worker, png_bytes):
    token = make_key()
    with httpx.Client(base_url=api, headers=bearer(token), timeout=30) as http:
        # 1. a JSON submit answers at once: the queued record, its URL in Location
        answer = http.post("/v1/jobs", json=small(prompt="a red bicycle", num_images=2, seed=7))
        assert answer.status_code == 201, answer.text
        record = answer.json()
        job_id = record["id"]
        assert answer.headers["location"] == record["links"]["self"] == f"/v1/jobs/{job_id}"
        assert record["state"] in ("queued", "running") and record["priority"] == "interactive"
        assert record["seed"] == 7 and record["params"]["prompt"] == "a red bicycle"
        assert "input_key" not in record and record["links"]["events"] == f"/v1/jobs/{job_id}/events"
        # 2. its events: the state first, the end last, with the final record
        with http.stream("GET", record["links"]["events"], timeout=TIMEOUT) as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
            events = list(sse(stream))
        assert events[0][0] == "state" and events[0][1]["id"] == job_id
        assert events[-1][0] == "end" and events[-1][1]["state"] == "succeeded", events[-1]
        assert all(name in ("state", "progress", "end") for name, _ in events)
        for name, data in events:
            if name == "progress":
                assert set(data) == {"step", "steps"} and 1 <= data["step"] <= data["steps"]
        # 3. the record, with each image's seed, digest, size and URL
        done = http.get(f"/v1/jobs/{job_id}").json()
        assert done == events[-1][1]
        assert [(i["index"], i["seed"], i["width"], i["height"]) for i in done["images"]] == [
            (0, 7, 256, 256), (1, 8, 256, 256)]
        assert done["links"]["images"] == [i["url"] for i in done["images"]]
        # 4. an image: a redirect to a presigned URL of the object store, which serves its bytes
        first = http.get(done["images"][0]["url"])
        assert first.status_code == 307 and "X-Amz-Signature=" in first.headers["location"]
        png = httpx.get(first.headers["location"], timeout=30).content
        assert hashlib.sha256(png).hexdigest() == done["images"][0]["sha256"]
        followed = http.get(done["images"][1]["url"], follow_redirects=True)
        assert hashlib.sha256(followed.content).hexdigest() == done["images"][1]["sha256"]
        assert http.get(f"/v1/jobs/{job_id}/images/2").status_code == 404
        # 5. an ended job cannot be cancelled: 409 naming its state
        refused = http.delete(f"/v1/jobs/{job_id}")
        assert refused.status_code == 409 and refused.json()["state"] == "succeeded"
        assert "succeeded" in refused.json()["detail"]
        # 6. img2img as a multipart form, the image a file part
        form = {"prompt": "a blue door", "width": "256", "height": "256", "num_inference_steps": "3",
                "strength": "0.5", "seed": "3"}
        answer = http.post("/v1/jobs", data=form, files={"image": ("door.png", png_bytes(), "image/png")})
        assert answer.status_code == 201, answer.text
        img2img = answer.json()
        assert img2img["mode"] == "img2img" and img2img["params"]["strength"] == 0.5 and img2img["seed"] == 3
        ended = wait_for(lambda: (r := http.get(f"/v1/jobs/{img2img['id']}").json())["state"] in
                         ("succeeded", "failed") and r, timeout=TIMEOUT)
        assert ended["state"] == "succeeded", ended["error"]
        png = http.get(ended["images"][0]["url"], follow_redirects=True).content
        assert hashlib.sha256(png).hexdigest() == ended["images"][0]["sha256"]


def test_json_img2img_takes_base64_and_local_storage_serves_png(settings_env, tmp_path, png_bytes):
    from models.settings import load_settings

    settings = load_settings(storage_url=(tmp_path / "store").as_uri(), api_auth="off")
    with serving(settings) as url, httpx.Client(base_url=url, timeout=30) as http:
        image = base64.b64encode(png_bytes()).decode()
        answer = http.post("/v1/jobs", json=small(prompt="a door", image=image))
        assert answer.status_code == 201 and answer.json()["mode"] == "img2img"
        refused = http.post("/v1/jobs", json=small(prompt="a door", image="not base64!"))
        assert refused.status_code == 422 and refused.json()["detail"][0].startswith("image='not base64!': not base64")
        # a job with no image yet has none to give; images from a local folder come as PNG bytes
        job_id = answer.json()["id"]
        assert http.get(f"/v1/jobs/{job_id}/images/0").status_code == 404
        png = png_bytes(color=(1, 2, 3))
        put_image(settings, job_id, png)
        served = http.get(f"/v1/jobs/{job_id}/images/0")
        assert served.status_code == 200 and served.headers["content-type"] == "image/png"
        assert served.content == png
        assert http.get("/readyz").json() == {"status": "ready"}


def put_image(settings: Any, job_id: str, png: bytes) -> None:
    """An image recorded for a job as a worker records one (no worker needed)."""
    from models.db import Database
    from models.storage import object_key_for, open_storage
    from models.tables import Image

    key = object_key_for(job_id, 0, 1)
    open_storage(settings.storage_url).put(key, png)
    db = Database(settings.database_url)
    try:
        with db.session() as session:
            session.add(Image(job_id=job_id, index=0, seed=1, object_key=key, sha256=hashlib.sha256(png).hexdigest(),
                              size_bytes=len(png), width=256, height=256))
    finally:
        db.dispose()


def test_cancel_a_queued_job(api, make_key):
    with httpx.Client(base_url=api, headers=bearer(make_key()), timeout=30) as http:
        job = http.post("/v1/jobs", json=small(prompt="a cat")).json()
        cancelled = http.delete(f"/v1/jobs/{job['id']}")
        assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
        again = http.delete(f"/v1/jobs/{job['id']}")
        assert again.status_code == 409 and again.json()["state"] == "cancelled"
        # a finished stream: the record, then the end at once
        with http.stream("GET", f"/v1/jobs/{job['id']}/events") as stream:
            assert [name for name, _ in sse(stream)] == ["state", "end"]


def test_events_end_without_an_event_and_stop_when_the_client_leaves(api, make_key, settings):
    import redis
    from sqlalchemy import create_engine, text

    from models.db import normalize_url
    from models.events import channel

    broker = redis.Redis.from_url(settings.broker_url)
    engine = create_engine(normalize_url(settings.database_url))
    subscribers = lambda job_id: broker.pubsub_numsub(channel(job_id))[0][1]  # noqa: E731
    try:
        with httpx.Client(base_url=api, headers=bearer(make_key()), timeout=30) as http:
            # 1. a job that ends with no event published (a lost hint): the re-read of its record ends the stream
            job = http.post("/v1/jobs", json=small(prompt="a cat")).json()
            with http.stream("GET", job["links"]["events"]) as stream:
                events = sse(stream)
                assert next(events)[1]["state"] == "queued"
                with engine.begin() as conn:
                    conn.execute(text("UPDATE jobs SET state = 'failed', error = 'x', finished_at = now() "
                                      "WHERE id = :id"), {"id": job["id"]})
                rest = list(events)
            assert [name for name, _ in rest] == ["state", "end"] and rest[-1][1]["state"] == "failed"
            # 2. a follower that goes away: its subscription goes too
            job = http.post("/v1/jobs", json=small(prompt="a dog")).json()
            with http.stream("GET", job["links"]["events"]) as stream:
                assert next(sse(stream))[0] == "state"
                assert subscribers(job["id"]) == 1
            wait_for(lambda: subscribers(job["id"]) == 0, timeout=10)
    finally:
        broker.close()
        engine.dispose()


def test_batch_all_or_nothing_and_listing_pages(api, make_key, settings):
    with httpx.Client(base_url=api, headers=bearer(make_key()), timeout=30) as http:
        before = job_count(settings)
        refused = http.post("/v1/jobs:batch", json={"requests": [small(prompt="a"), small(prompt="b", width=300)]})
        assert refused.status_code == 422
        assert refused.json()["detail"] == [
            "requests[1].width=300: value error, must be a multiple of 64 from 256 to 1024 (one of 256, 320, 384, "
            "448, 512, 576, 640, 704, 768, 832, 896, 960, 1024)"] or refused.json()["detail"][0].startswith(
            "requests[1].width=300: ")
        assert job_count(settings) == before  # nothing of the batch was written
        answer = http.post("/v1/jobs:batch", json={"requests": [small(prompt=f"cat {i}", seed=i) for i in range(5)],
                                                   "priority": "bulk"})
        assert answer.status_code == 201, answer.text
        made = answer.json()["jobs"]
        assert [j["seed"] for j in made] == list(range(5)) and {j["priority"] for j in made} == {"bulk"}
        # newest first, two at a time, the cursor carrying on where the page ended
        seen, cursor = [], None
        while True:
            page = http.get("/v1/jobs", params={"limit": 2, **({"cursor": cursor} if cursor else {})}).json()
            seen += [j["id"] for j in page["jobs"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert sorted(seen) == sorted(j["id"] for j in made) and len(seen) == 5
        created = [j["created_at"] for j in http.get("/v1/jobs").json()["jobs"]]
        assert created == sorted(created, reverse=True)
        http.delete(f"/v1/jobs/{made[0]['id']}")
        cancelled = http.get("/v1/jobs", params={"state": "cancelled"}).json()["jobs"]
        assert [j["id"] for j in cancelled] == [made[0]["id"]]
        assert http.get("/v1/jobs", params={"since": "2999-01-01T00:00:00Z"}).json()["jobs"] == []
        bad = http.get("/v1/jobs", params={"limit": 201, "state": "sleeping", "cursor": "nope"})
        assert bad.status_code == 422 and any(line.startswith("limit=201: ") for line in bad.json()["detail"])
        assert http.get("/v1/jobs", params={"cursor": "nope"}).status_code == 422
        assert http.get("/v1/jobs", params={"run": "no-such-run"}).status_code == 404


# -- idempotency -----------------------------------------------------------------------------------

def test_idempotent_retries_make_one_job(api, make_key, settings, png_bytes):
    with httpx.Client(base_url=api, headers=bearer(make_key()), timeout=30) as http:
        before = job_count(settings)
        body = small(prompt="a lighthouse", seed=1)
        first = http.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k-1"})
        retry = http.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k-1"})
        assert first.status_code == retry.status_code == 201
        assert retry.json() == first.json() and retry.headers["location"] == first.headers["location"]
        assert retry.headers["idempotent-replayed"] == "true"
        assert job_count(settings) == before + 1
        other = http.post("/v1/jobs", json={**body, "seed": 2}, headers={"Idempotency-Key": "k-1"})
        assert other.status_code == 409 and "another request" in other.json()["detail"]
        # a refusal is kept too: the same bad request gets the same 422
        bad = [http.post("/v1/jobs", json={"prompt": ""}, headers={"Idempotency-Key": "k-2"}) for _ in range(2)]
        assert [b.status_code for b in bad] == [422, 422] and bad[0].json() == bad[1].json()
        # a form sent twice has two multipart boundaries, and is still the same request
        form = {"prompt": "a door", "width": "256", "height": "256"}
        sent = [http.post("/v1/jobs", data=form, files={"image": ("a.png", png_bytes(), "image/png")},
                          headers={"Idempotency-Key": "k-3"}) for _ in range(2)]
        assert sent[0].status_code == 201 and sent[1].json() == sent[0].json()
        # two at once with one key: one job, one answer
        answers: list[httpx.Response] = []

        def post() -> None:
            with httpx.Client(base_url=api, headers=http.headers, timeout=30) as own:
                answers.append(own.post("/v1/jobs:batch", json={"requests": [body, body]},
                                        headers={"Idempotency-Key": "k-4"}))

        threads = [threading.Thread(target=post) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert {a.status_code for a in answers} == {201}
        assert len({json.dumps(a.json(), sort_keys=True) for a in answers}) == 1
        assert job_count(settings) == before + 1 + 1 + 2


# -- keys and limits -------------------------------------------------------------------------------

def test_keys_see_only_their_jobs_and_revocation_is_at_once(api, make_key, capsys):
    from producer.cli import main

    name_a = f"a-{os.urandom(4).hex()}"
    token_a, token_b = make_key(name=name_a), make_key()
    with httpx.Client(base_url=api, timeout=30) as http:
        job = http.post("/v1/jobs", json=small(prompt="a secret"), headers=bearer(token_a)).json()
        url = f"/v1/jobs/{job['id']}"
        assert http.get(url, headers=bearer(token_a)).status_code == 200
        for method in ("GET", "DELETE"):
            other = http.request(method, url, headers=bearer(token_b))
            assert other.status_code == 404 and other.json()["detail"] == f"no job with id {job['id']!r}"
        assert http.get(f"{url}/events", headers=bearer(token_b)).status_code == 404
        assert job["id"] not in [j["id"] for j in http.get("/v1/jobs", headers=bearer(token_b)).json()["jobs"]]
        assert job["id"] in [j["id"] for j in http.get("/v1/jobs", headers=bearer(token_a)).json()["jobs"]]
        # no token, a bad one, then A's after `sdqueue keys revoke`: 401 with a Bearer challenge
        for headers in ({}, bearer("sdq_not-a-key"), {"Authorization": "Basic eDp5"}):
            refused = http.get("/v1/jobs", headers=headers)
            assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Bearer")
        capsys.readouterr()
        assert main(["keys", "revoke", name_a]) == 0
        assert main(["keys", "list"]) == 0
        listed = capsys.readouterr().out
        assert name_a in listed and token_a not in listed and token_a[:12] in listed
        refused = http.get(url, headers=bearer(token_a))
        assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Bearer")
        assert http.get("/healthz").status_code == 200  # needs no key
    assert main(["keys", "revoke", "no-such-key"]) == 3


def test_rate_limit_and_cap_answer_429_with_retry_after(api, make_key):
    with httpx.Client(base_url=api, timeout=30) as http:
        # at most 3 submits a minute
        limited = bearer(make_key("--rate", "3/min"))
        codes = [http.post("/v1/jobs", json=small(prompt="a cat"), headers=limited).status_code for _ in range(3)]
        assert codes == [201, 201, 201]
        fourth = http.post("/v1/jobs", json=small(prompt="a cat"), headers=limited)
        assert fourth.status_code == 429 and 1 <= int(fourth.headers["retry-after"]) <= 60
        assert "3 times a minute" in fourth.json()["detail"]
        assert http.get("/v1/jobs", headers=limited).status_code == 200  # reads are not counted
        # at most 2 jobs queued or running (no worker: they stay queued)
        capped = bearer(make_key("--max-queued", "2"))
        codes = [http.post("/v1/jobs", json=small(prompt="a dog"), headers=capped).status_code for _ in range(2)]
        assert codes == [201, 201]
        third = http.post("/v1/jobs", json=small(prompt="a dog"), headers=capped)
        assert third.status_code == 429 and int(third.headers["retry-after"]) >= 1
        assert "cap is 2" in third.json()["detail"]
        # a job cancelled frees its place
        first = http.get("/v1/jobs", headers=capped).json()["jobs"][0]
        http.delete(first["links"]["self"], headers=capped)
        assert http.post("/v1/jobs", json=small(prompt="a dog"), headers=capped).status_code == 201


def test_a_bulk_only_key_submits_bulk(api, make_key):
    with httpx.Client(base_url=api, headers=bearer(make_key("--bulk-only")), timeout=30) as http:
        job = http.post("/v1/jobs", json=small(prompt="a field")).json()
        assert job["priority"] == "bulk"
        refused = http.post("/v1/jobs", json=small(prompt="a field", priority="interactive"))
        assert refused.status_code == 422 and refused.json()["detail"][0].startswith("priority='interactive': ")


# -- refusals --------------------------------------------------------------------------------------

def test_refusals_name_what_is_wrong(api, make_key, settings):
    with httpx.Client(base_url=api, headers=bearer(make_key()), timeout=30) as http:
        before = job_count(settings)
        # 422: one line per problem, each naming the field, the value and the bound (the CLI's words)
        answer = http.post("/v1/jobs", json={"prompt": "a cat", "num_images": 9, "guidance_scale": 30, "cfg": 1})
        assert answer.status_code == 422
        assert answer.json()["detail"] == ["num_images=9: input should be less than or equal to 4",
                                           "guidance_scale=30: input should be less than or equal to 20",
                                           "cfg is not a request field"]
        assert http.post("/v1/jobs", json=["a cat"]).json()["detail"] == [
            "request must be an object of fields, not list"]
        refused = http.post("/v1/jobs", json={"prompt": "a cat", "priority": "urgent"})
        assert refused.status_code == 422 and refused.json()["detail"] == [
            "priority='urgent': must be one of interactive, bulk"]
        # 400: not JSON
        for body in (b"{not json", b"", b"[NaN]", b"\xff\xfe"):
            refused = http.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
            assert refused.status_code == 400 and refused.json()["detail"].startswith("the body is"), body
        deep = b"[" * 100_000 + b"]" * 100_000
        assert http.post("/v1/jobs", content=deep, headers={"Content-Type": "application/json"}).status_code == 400
        refused = http.post("/v1/jobs", json=small(prompt="a"), headers={"Idempotency-Key": "x" * 300})
        assert refused.status_code == 422 and refused.json()["detail"][0].startswith("Idempotency-Key=xxx")
        # 404: no such job, no such path
        assert http.get("/v1/jobs/7b6f0e4c-0000-4000-8000-000000000000").status_code == 404
        assert http.get("/v1/jobs/not-an-id").status_code == 404
        assert http.delete("/v1/jobs/not-an-id").status_code == 404
        assert job_count(settings) == before


def test_bodies_over_the_bound_are_refused_413(settings_env):
    from models.settings import load_settings

    settings = load_settings(api_auth="off", api_max_body_bytes=64 * 1024)
    big = json.dumps({"prompt": "a" * 100_000}).encode()
    with serving(settings) as url, httpx.Client(base_url=url, timeout=30) as http:
        declared = http.post("/v1/jobs", content=big, headers={"Content-Type": "application/json"})
        assert declared.status_code == 413 and "65536 bytes" in declared.json()["detail"]

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it comes
            for start in range(0, len(big), 8192):
                yield big[start : start + 8192]

        counted = http.post("/v1/jobs", content=chunks(), headers={"Content-Type": "application/json"})
        assert counted.status_code == 413
        assert http.post("/v1/jobs", json=small(prompt="a cat")).status_code == 201  # under the bound


def test_unreachable_broker_is_503_and_nothing_is_written(settings, trace):
    from models.settings import load_settings

    down = load_settings(broker_url=f"redis://127.0.0.1:{free_port()}/0", api_auth="off")
    with serving(down) as url, httpx.Client(base_url=url, timeout=30) as http:
        before = trace()
        for send in (lambda: http.post("/v1/jobs", json=small(prompt="a cat")),
                     lambda: http.post("/v1/jobs:batch", json={"requests": [small(prompt="a cat")] * 3})):
            answer = send()
            assert answer.status_code == 503 and int(answer.headers["retry-after"]) >= 1
            assert "nothing was enqueued" in answer.json()["detail"]
        assert trace() == before  # no row, no message, no object
        ready = http.get("/readyz")
        assert ready.status_code == 503 and ready.json()["unavailable"] == ["broker"]
        assert "broker" in ready.json()["detail"]
        assert http.get("/healthz").status_code == 200


def test_unreachable_database_is_503(settings_env):
    from models.settings import load_settings

    down = load_settings(database_url=f"postgresql://postgres@127.0.0.1:{free_port()}/x", api_auth="off")
    with serving(down) as url, httpx.Client(base_url=url, timeout=30) as http:
        answer = http.post("/v1/jobs", json=small(prompt="a cat"))
        assert answer.status_code == 503 and answer.headers["retry-after"]
        assert "database" in answer.json()["detail"] and "Traceback" not in answer.text
        ready = http.get("/readyz")
        assert ready.status_code == 503 and ready.json()["unavailable"] == ["database"]


# -- the command -----------------------------------------------------------------------------------

def test_sdqueue_api_warns_loudly_without_auth(settings_env):
    port = free_port()
    env = {**os.environ, "SDQUEUE_API_AUTH": "off"}
    proc = subprocess.Popen([sys.executable, "-m", "producer.cli", "api", "--port", str(port)], env=env,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any("Uvicorn running" in line for line in lines):
            lines.append(proc.stderr.readline())
        warning = next(line for line in lines if "WARNING" in line)
        assert "ANYONE WHO CAN REACH" in warning and str(port) in warning
        assert httpx.post(f"http://127.0.0.1:{port}/v1/jobs", json=small(prompt="a cat"), timeout=30).status_code == 201
        assert httpx.get(f"http://127.0.0.1:{port}/openapi.json", timeout=30).json()["paths"]["/v1/jobs:batch"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        if proc.stderr is not None:
            proc.stderr.close()


def test_webhook_urls_are_checked_at_submit(settings_env):
    from models.settings import load_settings

    with serving(load_settings(api_auth="off")) as url, httpx.Client(base_url=url, timeout=30) as http:
        refused = http.post("/v1/jobs", json=small(prompt="a cat", webhook_url="http://127.0.0.1:9/hook"))
        assert refused.status_code == 422 and refused.json()["detail"][0].startswith("webhook_url='http://127.0.0.1:9/")
        assert http.post("/v1/jobs", json=small(prompt="a cat", webhook_url=5)).status_code == 422
    with serving(load_settings(api_auth="off", webhook_allow_private=True)) as url:
        job = httpx.post(f"{url}/v1/jobs", json=small(prompt="a cat", webhook_url="http://127.0.0.1:9/hook"),
                         timeout=30)
        assert job.status_code == 201 and job.json()["webhook"]["url"] == "http://127.0.0.1:9/hook"


def test_the_api_loads_no_torch_and_no_worker():
    from tests.test_layout import loaded_after

    assert loaded_after("import producer.api, producer.api.serve, producer.api.jobs, producer.api.events") == []
