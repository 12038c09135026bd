"""The HTTP API against careless and hostile input (issue 14, part 2), on the real Redis,
PostgreSQL and S3 server: limits that hold under concurrent requests, a cap on open event
streams, control characters and duplicate JSON names refused with a 4xx naming the field, no
object left without a job row, a fresh bucket made by /readyz. Each refusal leaves nothing written
and is never a 500."""

from __future__ import annotations

import base64
import json
import threading
import uuid
from contextlib import ExitStack
from typing import Any, Callable

import httpx
import pytest

from tests.conftest import BUCKET, small, wait_for
from tests.servers import s3_client
from tests.test_api import api, bearer, make_key, serving, sse  # noqa: F401  (api, make_key: fixtures)

PUBLIC_HOOK = "http://93.184.215.14/hook"  # a public address: no DNS lookup, allowed without SDQUEUE_WEBHOOK_ALLOW_PRIVATE


def at_once(count: int, send: Callable[[httpx.Client], httpx.Response], base_url: str,
            headers: dict[str, str]) -> list[httpx.Response]:
    """`count` requests sent together, each from a thread and connection of its own."""
    start = threading.Barrier(count)
    answers: list[httpx.Response] = []
    lock = threading.Lock()

    def one() -> None:
        with httpx.Client(base_url=base_url, headers=headers, timeout=120) as http:
            start.wait()
            answer = send(http)
            with lock:
                answers.append(answer)

    threads = [threading.Thread(target=one) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(answers) == count
    return answers


def post_json(http: httpx.Client, path: str, data: Any) -> httpx.Response:
    """JSON as a client may send it: escaped as \\uXXXX, so that a lone surrogate can be sent too."""
    return http.post(path, content=json.dumps(data).encode(), headers={"Content-Type": "application/json"})


def key_id(settings: Any, name: str) -> str:
    from sqlalchemy import select

    from models.db import Database
    from models.tables import ApiKey

    db = Database(settings.database_url)
    try:
        with db.session() as session:
            return session.scalars(select(ApiKey.id).where(ApiKey.name == name)).one()
    finally:
        db.dispose()


def jobs_of_key(settings: Any, key: str, states: tuple[str, ...] = ("queued", "running")) -> int:
    from sqlalchemy import func, select

    from models.db import Database
    from models.tables import Job

    db = Database(settings.database_url)
    try:
        with db.session() as session:
            return session.scalar(select(func.count()).select_from(Job).where(
                Job.api_key_id == key, Job.state.in_(states))) or 0
    finally:
        db.dispose()


# -- 1. limits under concurrent requests -----------------------------------------------------------

def test_the_queued_cap_holds_under_20_concurrent_batches(api, make_key, settings, trace):
    name = f"erin-{uuid.uuid4().hex[:8]}"
    token = make_key("--max-queued", "5", name=name)
    before = trace()
    batch = {"requests": [small(prompt=f"a fox {i}") for i in range(5)]}
    answers = at_once(20, lambda http: http.post("/v1/jobs:batch", json=batch), api, bearer(token))
    codes = sorted(answer.status_code for answer in answers)
    assert codes == [201] + [429] * 19, [a.text for a in answers if a.status_code not in (201, 429)]
    for refused in (a for a in answers if a.status_code == 429):
        assert "its cap is 5" in refused.json()["detail"] and int(refused.headers["retry-after"]) >= 1
    # exactly the one batch written and sent: no row, message or object for the 19 refused
    assert jobs_of_key(settings, key_id(settings, name)) == 5
    jobs, messages, objects = trace()
    assert (jobs - before[0], messages - before[1], objects - before[2]) == (5, 5, 0)


def test_the_queued_cap_holds_under_concurrent_single_submits_and_img2img(api, make_key, settings, trace, png_bytes):
    name = f"erin-{uuid.uuid4().hex[:8]}"
    token = make_key("--max-queued", "3", name=name)
    before = trace()
    image = base64.b64encode(png_bytes()).decode()
    answers = at_once(12, lambda http: http.post("/v1/jobs", json=small(prompt="a door", image=image)), api,
                      bearer(token))
    assert sorted(a.status_code for a in answers) == [201] * 3 + [429] * 9
    assert jobs_of_key(settings, key_id(settings, name)) == 3
    # the refused submits' inputs (stored before the count) were taken back: one object per job
    assert tuple(now - then for now, then in zip(trace(), before)) == (3, 3, 3)


def test_the_queued_cap_holds_on_sqlite(settings_env, tmp_path):
    from models.db import Database, upgrade
    from models.settings import load_settings
    from producer.api.keys import create_key

    url = f"sqlite:///{tmp_path / 'sdqueue.db'}"
    upgrade(url)
    db = Database(url)
    try:
        new = create_key(db, "erin", max_queued=5)
    finally:
        db.dispose()
    settings = load_settings(database_url=url)
    batch = {"requests": [small(prompt=f"a fox {i}") for i in range(5)]}
    with serving(settings) as base_url:
        answers = at_once(20, lambda http: http.post("/v1/jobs:batch", json=batch), base_url, bearer(new.token))
    assert sorted(a.status_code for a in answers) == [201] + [429] * 19, [a.text for a in answers]
    assert jobs_of_key(settings, new.key.id) == 5


def test_the_rate_holds_under_concurrent_submits(api, make_key, settings):
    name = f"rate-{uuid.uuid4().hex[:8]}"
    token = make_key("--rate", "5/min", name=name)
    answers = at_once(30, lambda http: http.post("/v1/jobs", json=small(prompt="a cat")), api, bearer(token))
    assert sorted(a.status_code for a in answers) == [201] * 5 + [429] * 25
    assert all("5 times a minute" in a.json()["detail"] for a in answers if a.status_code == 429)
    assert jobs_of_key(settings, key_id(settings, name)) == 5


# -- 2. open event streams per key -------------------------------------------------------------------

def test_event_streams_are_capped_per_key_and_freed_when_they_end(settings, make_key):
    import redis

    from models.events import channel
    from producer.api.limits import streams_key

    capped = settings.model_copy(update={"api_max_streams_per_key": 2})
    name = f"follower-{uuid.uuid4().hex[:8]}"
    token, other = make_key(name=name), make_key()
    places = streams_key(key_id(settings, name))
    broker = redis.Redis.from_url(settings.broker_url)
    try:
        with serving(capped) as url, httpx.Client(base_url=url, headers=bearer(token), timeout=60) as http, \
                ExitStack() as streams:
            job = http.post("/v1/jobs", json=small(prompt="a cat")).json()  # no worker: it stays queued
            events_url = job["links"]["events"]

            def open_stream(headers: dict[str, str] | None = None) -> httpx.Response:
                stream = streams.enter_context(http.stream("GET", events_url, headers=headers))
                if stream.status_code == 200:
                    assert next(sse(stream))[0] == "state"
                else:
                    stream.read()
                return stream

            first, second = open_stream(), open_stream()
            assert first.status_code == second.status_code == 200
            # one more of this key's: 429 naming the setting and the bound, and no subscription made
            third = open_stream()
            assert third.status_code == 429 and int(third.headers["retry-after"]) >= 1
            detail = third.json()["detail"]
            assert "cap is 2" in detail and "SDQUEUE_API_MAX_STREAMS_PER_KEY" in detail
            assert broker.pubsub_numsub(channel(job["id"]))[0][1] == 2
            # another key has places of its own (the job is not its own: 404, place given back)
            assert open_stream(bearer(other)).status_code == 404
            # a client that goes away frees its place
            first.close()

            def reopened() -> bool:
                stream = open_stream()
                if stream.status_code == 200:
                    return True
                assert stream.status_code == 429
                stream.close()
                return False

            wait_for(reopened, timeout=60, step=0.2)
            # a stream that ends (the job is cancelled) frees its place
            assert http.delete(f"/v1/jobs/{job['id']}").status_code == 200
            with http.stream("GET", events_url) as ended:
                assert [name for name, _ in sse(ended)] == ["state", "end"]
            streams.close()
            wait_for(lambda: broker.zcard(places) == 0, timeout=60, step=0.2)
    finally:
        broker.delete(places)
        broker.close()


# -- 3. control characters in API-only fields; no object without a job row ----------------------------

@pytest.mark.parametrize("hook", [PUBLIC_HOOK + "\x00x", PUBLIC_HOOK + "\x1b[2J", PUBLIC_HOOK + "\r\nX-Evil: 1",
                                  PUBLIC_HOOK + "\ud800"],
                         ids=["nul", "escape", "crlf", "surrogate"])
def test_a_control_character_in_webhook_url_is_422_and_leaves_no_input(api, make_key, trace, png_bytes, hook):
    with httpx.Client(base_url=api, headers=bearer(make_key()), timeout=60) as http:
        before = trace()
        big = png_bytes(1024, 1024)
        form = {"prompt": "a door", "width": "256", "height": "256", "strength": "0.6", "webhook_url": hook}
        if "\ud800" not in hook:  # a form's text is UTF-8: a lone surrogate cannot be sent in one
            refused = http.post("/v1/jobs", data=form, files={"image": ("a.png", big, "image/png")})
            assert refused.status_code == 422, refused.text
            [line] = refused.json()["detail"]
            assert line.startswith("webhook_url=") and "must not hold control characters" in line
        as_json = post_json(http, "/v1/jobs", small(prompt="a door", image=base64.b64encode(big).decode(),
                                                    webhook_url=hook))
        assert as_json.status_code == 422 and as_json.json()["detail"][0].startswith("webhook_url="), as_json.text
        batch = post_json(http, "/v1/jobs:batch", {"requests": [small(prompt="a")], "webhook_url": hook})
        assert batch.status_code == 422 and batch.json()["detail"][0].startswith("webhook_url=")
        assert trace() == before  # no job row, no message, no object (the bucket listed under the test's prefix)


def test_an_input_is_taken_back_when_the_cap_refuses_its_job(api, make_key, settings, png_bytes):
    token = make_key("--max-queued", "1")
    s3 = s3_client(settings.s3_endpoint_url)
    prefix = settings.storage_url.removeprefix(f"s3://{BUCKET}/") + "/inputs/"

    def inputs() -> list[str]:
        return [item["Key"] for item in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])]

    with httpx.Client(base_url=api, headers=bearer(token), timeout=60) as http:
        files = {"image": ("a.png", png_bytes(), "image/png")}
        first = http.post("/v1/jobs", data={"prompt": "a door", "width": "256", "height": "256"}, files=files)
        assert first.status_code == 201
        stored = inputs()
        assert len(stored) == 1
        second = http.post("/v1/jobs", data={"prompt": "a door", "width": "256", "height": "256"}, files=files)
        assert second.status_code == 429 and "cap is 1" in second.json()["detail"]
        assert inputs() == stored


def test_control_characters_in_the_run_filter_and_key_names_are_refused(api, make_key, settings):
    from models.db import Database
    from producer.api.keys import BadKeyOption, create_key

    with httpx.Client(base_url=api, headers=bearer(make_key()), timeout=60) as http:
        for run in ("x\x00y", "x\x1by", "x\ny"):
            refused = http.get("/v1/jobs", params={"run": run})
            assert refused.status_code == 422, refused.text
            assert refused.json()["detail"][0].startswith(f"run={run!r}: must not hold control characters")
    db = Database(settings.database_url)
    try:
        for name in ("erin\x00", "erin\x1b[2J", "erin\nx"):
            with pytest.raises(BadKeyOption, match="must not hold control characters"):
                create_key(db, name)
    finally:
        db.dispose()


# -- 4. duplicate names in JSON -----------------------------------------------------------------------

@pytest.mark.parametrize(("path", "body", "where"), [
    ("/v1/jobs", b'{"prompt": "a cat", "prompt": "a dog"}', "prompt"),
    ("/v1/jobs", b'{"prompt": "a cat", "webhook_url": "http://93.184.215.14/a", "webhook_url": null}', "webhook_url"),
    ("/v1/jobs:batch", b'{"requests": [{"prompt": "a"}], "requests": [{"prompt": "b"}]}', "requests"),
    ("/v1/jobs:batch", b'{"requests": [{"prompt": "a"}, {"prompt": "b", "seed": 1, "seed": 2}]}', "requests[1].seed"),
], ids=["top", "option", "batch", "nested"])
def test_a_json_name_given_twice_is_refused(api, make_key, trace, path, body, where):
    with httpx.Client(base_url=api, headers=bearer(make_key()), timeout=60) as http:
        before = trace()
        refused = http.post(path, content=body, headers={"Content-Type": "application/json"})
        assert refused.status_code == 422, refused.text
        assert refused.json()["detail"] == [f"{where} is given more than once"]
        assert trace() == before


# -- 5. /readyz on a fresh deployment ------------------------------------------------------------------

def test_readyz_makes_a_missing_bucket(settings):
    from botocore.exceptions import ClientError

    bucket = f"sdqueue-fresh-{uuid.uuid4().hex[:12]}"
    s3 = s3_client(settings.s3_endpoint_url)
    with pytest.raises(ClientError):
        s3.head_bucket(Bucket=bucket)
    fresh = settings.model_copy(update={"storage_url": f"s3://{bucket}/sdqueue"})
    try:
        with serving(fresh) as url, httpx.Client(base_url=url, timeout=60) as http:
            ready = http.get("/readyz")
            assert ready.status_code == 200 and ready.json() == {"status": "ready"}, ready.text
            s3.head_bucket(Bucket=bucket)
            assert http.get("/readyz").status_code == 200  # and again, the bucket there now
    finally:
        try:
            s3.delete_bucket(Bucket=bucket)
        except ClientError:
            pass


# -- 6. control characters in paths and queries --------------------------------------------------------

PATHS = [
    ("GET", "/runs/x%00y"), ("GET", "/runs/x%1B%5B2Jy"), ("GET", "/runs/x%0Ay"), ("GET", "/runs/ok?page=%00"),
    ("GET", "/jobs/x%00y"), ("GET", "/jobs/x%00y/images/0"), ("GET", "/jobs/x%00y/images/%00"),
    ("GET", "/jobs/x%00y/events"), ("POST", "/jobs/x%00y/again"),
    ("GET", "/v1/jobs/x%00y"), ("DELETE", "/v1/jobs/x%00y"), ("GET", "/v1/jobs/x%00y/events"),
    ("GET", "/v1/jobs/x%00y/images/0"), ("GET", "/v1/jobs/7b6f0e4c-0000-4000-8000-000000000000/images/%00"),
    ("GET", "/v1/jobs?run=x%00y"), ("GET", "/v1/jobs?run=%1B"), ("GET", "/v1/jobs?cursor=%00"),
    ("GET", "/v1/jobs?since=%00"), ("GET", "/v1/jobs?state=%00"), ("GET", "/v1/jobs?limit=%00"),
    ("GET", "/v1/jobs/x%ED%A0%80y"),
]


@pytest.mark.parametrize("auth", ["off", "on"])
def test_control_characters_in_paths_and_queries_are_4xx(settings, make_key, auth):
    token = make_key() if auth == "on" else None
    with serving(settings.model_copy(update={"api_auth": auth})) as url, httpx.Client(base_url=url, timeout=60) as http:
        if token:
            http.headers.update(bearer(token))
            http.cookies.set("sdqueue_key", token)
        for method, path in PATHS:
            answer = http.request(method, path)
            assert answer.status_code in (404, 422), (method, path, answer.status_code, answer.text[:300])
            assert "Traceback" not in answer.text
        login = http.get("/login?next=%00")
        assert login.status_code in (200, 303) and login.headers.get("location", "/") == "/"


# -- replay: control characters in request text -------------------------------------------------------

@pytest.mark.parametrize(("body", "where", "what"), [
    (b'{"prompt": "a\\u0000b"}', "prompt", "NUL (U+0000)"),
    (b'{"prompt": "a \\u001b[2J\\u001b[31mred"}', "prompt", "escape (U+001B)"),
    (b'{"prompt": "a", "negative_prompt": "x\\u0000"}', "negative_prompt", "NUL (U+0000)"),
    (b'{"prompt": "a\\ud800"}', "prompt", "\\ud800"),
], ids=["nul", "escape", "negative", "surrogate"])
def test_control_characters_in_a_prompt_are_422(api, make_key, trace, body, where, what):
    with httpx.Client(base_url=api, headers=bearer(make_key()), timeout=60) as http:
        before = trace()
        answers = [http.post("/v1/jobs", content=body, headers={"Content-Type": "application/json",
                                                                "Idempotency-Key": "same"}) for _ in range(2)]
        assert [a.status_code for a in answers] == [422, 422], answers[0].text
        [line] = answers[0].json()["detail"]
        assert line.startswith(f"{where}=") and what in line
        assert answers[1].json() == answers[0].json()  # the refusal was kept and given again
        batch = http.post("/v1/jobs:batch", content=b'{"requests": [{"prompt": "ok"}, ' + body + b"]}",
                          headers={"Content-Type": "application/json"})
        assert batch.status_code == 422 and batch.json()["detail"][0].startswith(f"requests[1].{where}=")
        assert trace() == before


def test_control_characters_in_a_form_prompt_are_422(api, make_key, trace, png_bytes):
    with httpx.Client(base_url=api, headers=bearer(make_key()), timeout=60) as http:
        before = trace()
        for prompt in ("a\x00b", "a\x1b[2Jb"):
            refused = http.post("/v1/jobs", data={"prompt": prompt, "width": "256", "height": "256"},
                                files={"image": ("a.png", png_bytes(), "image/png")})
            assert refused.status_code == 422 and refused.json()["detail"][0].startswith("prompt="), refused.text
        assert trace() == before
