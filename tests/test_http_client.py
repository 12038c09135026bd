"""producer.http against a real API (uvicorn on loopback) on the real Redis, PostgreSQL and S3
server: submit, wait (events, and polling when the stream is refused), fetch, cancel, batches,
every class of error, an idempotent retry after a dropped connection, runs, and the async client."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
import threading
import uuid
from contextlib import closing
from pathlib import Path
from typing import Any, Iterator

import anyio
import httpx
import pytest

from producer import http
from tests.conftest import small
from tests.servers import free_port
from tests.test_api import api, bearer, make_key, serving  # noqa: F401  (fixtures)

TIMEOUT = 120
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def no_key_state_left(settings: Any) -> Iterator[None]:
    """The rate logs and stream places the test's keys left in Redis, removed."""
    yield
    import redis
    from sqlalchemy import create_engine, select

    from models.db import normalize_url
    from models.tables import ApiKey

    engine = create_engine(normalize_url(settings.database_url))
    broker = redis.Redis.from_url(settings.broker_url)
    try:
        with engine.connect() as conn:
            ids = list(conn.execute(select(ApiKey.id)).scalars())
        for key_id in ids:
            broker.delete(f"sdqueue:api:rate:{key_id}", f"sdqueue:api:streams:{key_id}")
    finally:
        engine.dispose()
        broker.close()


def client(url: str, token: str | None, **options: Any) -> http.Client:
    return http.Client(url, api_key=token, timeout=TIMEOUT, **options)


def cancel_on_first(api_url: str, token: str, job_id: str) -> Any:
    """An on_event that cancels the job through the API at its first state event: the wait then
    ends by a state change it sees, with no worker and no clock."""
    done: list[str] = []

    def on_event(event: dict[str, Any]) -> None:
        if event["type"] == "state" and not done:
            done.append(event["state"])
            with client(api_url, token) as other:
                other.cancel(job_id)

    return on_event


# -- with a worker: a job that ends with images --------------------------------------------------

def test_submit_wait_fetch(api, make_key, worker, tmp_path):
    token = make_key()
    with client(api, token) as sdq:
        # 1. submit answers the record as queued; wait follows its events to the end
        job = sdq.submit(small(prompt="a red bicycle", num_images=2, seed=7))
        assert job.state in ("queued", "running") and job.seed == 7 and job.params["prompt"] == "a red bicycle"
        events: list[dict[str, Any]] = []
        done = sdq.wait(job.id, timeout=TIMEOUT, on_event=events.append)
        assert done.state == "succeeded" and done.ended and done.finished_at is not None
        kinds = [event["type"] for event in events]
        assert "polling" not in kinds and kinds[-1] == "state" and events[-1]["job"] == done
        assert all(1 <= e["step"] <= e["steps"] for e in events if e["type"] == "progress")
        assert [(i.index, i.seed, i.width, i.height) for i in done.images] == [(0, 7, 256, 256), (1, 8, 256, 256)]
        # 2. fetch: each image whole, as recorded; again without force refused before any download
        out = tmp_path / "out" / "deep"
        paths = sdq.fetch(job.id, out)
        assert paths == [out / f"{job.id}-0.png", out / f"{job.id}-1.png"]
        for path, image in zip(paths, done.images):
            assert hashlib.sha256(path.read_bytes()).hexdigest() == image.sha256
        from models.errors import BadDestination

        paths[1].write_bytes(b"mine")
        with pytest.raises(BadDestination, match="exists"):
            sdq.fetch(job.id, out)
        assert paths[1].read_bytes() == b"mine" and sorted(out.iterdir()) == paths
        assert sdq.fetch(job.id, out, force=True) == paths
        assert hashlib.sha256(paths[1].read_bytes()).hexdigest() == done.images[1].sha256
        assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left
        # 3. cancelling an ended job: Conflict with its state
        with pytest.raises(http.Conflict) as refused:
            sdq.cancel(job.id)
        assert refused.value.status_code == 409 and refused.value.state == "succeeded"


# -- without a worker ------------------------------------------------------------------------------

def test_wait_follows_the_events_or_polls_when_the_stream_is_refused(settings, make_key):
    token = make_key()
    with serving(settings.model_copy(update={"api_max_streams_per_key": 1})) as url, client(url, token) as sdq:
        # 1. the event stream: cancelled through the API at its first state, the wait sees the end
        job = sdq.submit(small(prompt="a slow snail"))
        events: list[dict[str, Any]] = []
        cancel = cancel_on_first(url, token, job.id)
        done = sdq.wait(job.id, timeout=TIMEOUT, on_event=lambda e: (events.append(e), cancel(e)))
        assert done.state == "cancelled" and [e["type"] for e in events] == ["state", "state"]
        # 2. the key's one stream place taken: the stream is refused (429), the wait polls the record
        held = sdq.submit(small(prompt="a held stream"))
        other = sdq.submit(small(prompt="a polled snail"))
        with httpx.Client(base_url=url, headers=bearer(token), timeout=TIMEOUT) as raw, \
                raw.stream("GET", f"/v1/jobs/{held.id}/events") as stream:
            assert stream.status_code == 200
            events = []
            cancel = cancel_on_first(url, token, other.id)
            done = sdq.wait(other.id, timeout=TIMEOUT, poll=0.05, on_event=lambda e: (events.append(e), cancel(e)))
        assert done.state == "cancelled"
        assert events[0]["type"] == "polling" and "SDQUEUE_API_MAX_STREAMS_PER_KEY" in events[0]["reason"]
        assert [e["state"] for e in events[1:]] == ["queued", "cancelled"]
        # 3. a timeout: WaitTimeout with the state then, the job untouched
        with pytest.raises(http.WaitTimeout) as late:
            sdq.wait(held.id, timeout=0.3)
        assert late.value.state == "queued" and late.value.job.id == held.id
        for job_id in (held.id,):
            sdq.cancel(job_id)


def test_img2img_batch_listing_and_cancel(api, make_key, png_bytes, tmp_path, trace):
    token = make_key()
    with client(api, token) as sdq:
        # an init image as bytes, and as a path: a multipart submit each
        picture = tmp_path / "in.png"
        picture.write_bytes(png_bytes())
        from_bytes = sdq.submit(small(prompt="a watercolour", strength=0.6), image=png_bytes(), priority="bulk")
        from_path = sdq.submit({"prompt": "a pastel", "seed": 3, "use_compel": False}, image=picture)
        assert from_bytes.mode == from_path.mode == "img2img" and from_bytes.priority == "bulk"
        assert from_bytes.params["strength"] == 0.6 and from_path.seed == 3
        # a batch, all or nothing
        batch = sdq.submit_many([small(prompt=f"cat {i}") for i in range(3)], priority="bulk")
        assert [job.params["prompt"] for job in batch] == ["cat 0", "cat 1", "cat 2"]
        before = trace()
        with pytest.raises(http.Invalid) as bad:
            sdq.submit_many([small(prompt="fine"), small(prompt="too wide", width=500)])
        assert bad.value.rejects == [bad.value.rejects[0]] and bad.value.rejects[0].startswith("requests[1].width=500")
        assert trace() == before  # nothing enqueued
        # the key's jobs, newest first, two a page
        listed = list(sdq.jobs(page_size=2))
        ids = [job.id for job in listed]  # a batch's jobs may share a creation time: their order is by id
        assert set(ids[:3]) == {job.id for job in batch} and ids[3:] == [from_path.id, from_bytes.id]
        assert [job.id for job in sdq.jobs(state="queued", page_size=200)] == [job.id for job in listed]
        for job in listed:
            assert sdq.cancel(job.id).state == "cancelled"


def test_errors_of_each_class(api, settings, make_key, tmp_path, trace):
    token = make_key()
    with client(api, token) as sdq:
        before = trace()
        # 422: the field, its value and its bound; nothing enqueued
        with pytest.raises(http.Invalid) as invalid:
            sdq.submit({"prompt": "a cat", "width": 500, "num_images": 9})
        assert invalid.value.status_code == 422
        assert [line.split("=")[0] for line in invalid.value.rejects] == ["num_images", "width"]
        assert invalid.value.message.startswith("invalid request: num_images=9")
        # a file named as the image that cannot be read: refused before anything is sent
        with pytest.raises(http.Invalid, match="image=.*is a directory") as unread:
            sdq.submit({"prompt": "a cat"}, image=tmp_path)
        assert unread.value.status_code is None
        assert trace() == before
        # 404, for an id never used and for a malformed one
        for job_id in (str(uuid.uuid4()), "not-a-uuid"):
            with pytest.raises(http.NotFound) as missing:
                sdq.get(job_id)
            assert missing.value.status_code == 404 and "no job with id" in missing.value.message
        with pytest.raises(http.NotFound):
            sdq.get("../../v1/keys")  # one path segment, whatever it holds
        # 409: an Idempotency-Key used for another request
        sdq.submit(small(prompt="one"), idempotency_key="same-key")
        with pytest.raises(http.Conflict, match="another request"):
            sdq.submit(small(prompt="another"), idempotency_key="same-key")
    # 401: a token the API does not know
    with client(api, "sdq_not-a-key") as stranger, pytest.raises(http.Unauthorized) as refused:
        stranger.get(str(uuid.uuid4()))
    assert refused.value.status_code == 401
    # 429: over the key's rate, with when to try again
    with client(api, make_key("--rate", "1/min")) as slow:
        slow.submit(small(prompt="first"))
        with pytest.raises(http.RateLimited) as limited:
            slow.submit(small(prompt="second"))
        assert limited.value.status_code == 429 and limited.value.retry_after and limited.value.retry_after > 0
    # 503: the API's database is away (nothing answers on its port): Retry-After said
    gone = settings.model_copy(update={"database_url": f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/x"})
    with serving(gone) as url, client(url, token, retries=0) as away:
        with pytest.raises(http.Unavailable) as down:
            away.get(str(uuid.uuid4()))
        assert down.value.status_code == 503 and down.value.retry_after == 5
    # no API at all: Unavailable with no status, after the retries
    with client(f"http://127.0.0.1:{free_port()}", token, retries=2, backoff=0.01) as nowhere:
        with pytest.raises(http.Unavailable, match="cannot be reached") as unreachable:
            nowhere.get(str(uuid.uuid4()))
        assert unreachable.value.status_code is None
    with pytest.raises(ValueError, match="SDQUEUE_API_URL"):
        http.Client("ftp://example.org")


class DroppingProxy:
    """A TCP relay to the API that delivers the first request it carries, then closes that
    connection before a byte of the answer reaches the client: a connection dropped after the
    request went out. Later connections are relayed both ways."""

    def __init__(self, port: int):
        self.target = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._relay, args=(conn, self.connections == 1), daemon=True).start()

    def _relay(self, conn: socket.socket, drop: bool) -> None:
        with closing(conn), closing(socket.create_connection(("127.0.0.1", self.target))) as upstream:
            threading.Thread(target=self._pipe, args=(conn, upstream), daemon=True).start()
            if drop:
                upstream.recv(1)  # the API answered: the request was carried out
                conn.shutdown(socket.SHUT_RDWR)  # a FIN now, though another thread still reads it
                return
            self._pipe(upstream, conn)

    @staticmethod
    def _pipe(source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        finally:
            try:
                target.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def close(self) -> None:
        self.listener.close()


def test_a_submit_retried_after_a_dropped_connection_is_not_doubled(api, make_key):
    token = make_key()
    proxy = DroppingProxy(int(api.rsplit(":", 1)[1]))
    try:
        with client(proxy.url, token, backoff=0.01) as sdq:
            job = sdq.submit(small(prompt="only once"))
            assert proxy.connections == 2  # the answer of the first was lost: the retry got it
            assert job.raw  # the first answer, given again
    finally:
        proxy.close()
    with client(api, token) as sdq:
        assert [j.id for j in sdq.jobs()] == [job.id]  # one job, not two
        # the same key again, from another call: the same answer, still one job
        again = sdq.submit(small(prompt="kept"), idempotency_key="k-1")
        assert sdq.submit(small(prompt="kept"), idempotency_key="k-1").id == again.id
        batch = sdq.submit_many([small(prompt="a"), small(prompt="b")], idempotency_key="k-2")
        assert [j.id for j in sdq.submit_many([small(prompt="a"), small(prompt="b")], idempotency_key="k-2")] == \
            [j.id for j in batch]
        assert len(list(sdq.jobs())) == 4
        for listed in sdq.jobs():
            sdq.cancel(listed.id)


def test_runs(api, make_key, tmp_path):
    token = make_key()
    name = f"cats-{uuid.uuid4().hex[:8]}"
    manifest = tmp_path / "cats.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in [
        {"prompt": "a cat", "seed": 1}, {"prompt": "a dog", "seed": 2}, {"prompt": "a bad one", "width": 500}]))
    with client(api, token) as sdq:
        # 1. bad rows refuse the whole file, with the rejects; skip_invalid makes the run of the others
        with pytest.raises(http.Invalid) as refused:
            sdq.create_run(manifest, name=name, defaults={"width": 256, "height": 256, "num_inference_steps": 3})
        assert refused.value.status_code == 422 and refused.value.body["reject_count"] == 1
        assert refused.value.body["rejects"][0]["line"] == 3
        made = sdq.create_run(manifest, name=name, skip_invalid=True,
                              defaults={"width": 256, "height": 256, "num_inference_steps": 3})
        assert made.created and made.written == 2 and made.reject_count == 1 and made.run.name == name
        assert made.run.jobs["queued"] == 2 and made.run.total == 2 and not made.run.finished
        again = sdq.create_run(manifest.read_bytes(), name=name, format="jsonl", skip_invalid=True,
                               defaults={"width": 256, "height": 256, "num_inference_steps": 3})
        assert not again.created and again.written == 0  # the same source and defaults: nothing twice
        # 2. listed, shown; its jobs listed by run
        assert [run.name for run in sdq.runs()] == [name]
        shown = sdq.run(name)
        assert shown.state == "queued" and shown.images_total == 2 and shown.priority == "bulk"
        assert sorted(job.params["prompt"] for job in sdq.jobs(run=name)) == ["a cat", "a dog"]
        # 3. not finished: no export yet; cancelled: retried (none failed); then exported, empty
        with pytest.raises(http.Conflict, match="has not finished"):
            sdq.export_run(name, tmp_path / "early", format="imagefolder")
        run, cancelled = sdq.cancel_run(name, "all")
        assert cancelled == 2 and run.state == "cancelled" and run.finished
        assert sdq.retry_run(name)[1] == 0
        files = sdq.export_run(name, tmp_path / "dataset", format="imagefolder")
        assert files and all(path.is_relative_to(tmp_path / "dataset") for path in files)
        assert (tmp_path / "dataset" / "metadata.jsonl") in files
        from models.errors import BadDestination

        with pytest.raises(BadDestination, match="not empty"):
            sdq.export_run(name, tmp_path / "dataset", format="imagefolder")
        with pytest.raises(http.NotFound, match="no run named"):
            sdq.run("dogs")


def test_async_client(api, make_key, png_bytes):
    token = make_key()

    async def main() -> None:
        async with http.AsyncClient(api, api_key=token, timeout=TIMEOUT) as sdq:
            job = await sdq.submit(small(prompt="an async cat", seed=5))
            assert (await sdq.get(job.id)).seed == 5
            batch = await sdq.submit_many([small(prompt="one"), small(prompt="two")], idempotency_key="a-1")
            img = await sdq.submit({"prompt": "a copy"}, image=png_bytes())
            assert img.mode == "img2img"
            listed = [j.id async for j in sdq.jobs(page_size=2)]
            assert listed[0] == img.id and set(listed[1:3]) == {j.id for j in batch} and listed[3:] == [job.id]
            # a job cancelled: wait sees its end on the event stream
            await sdq.cancel(job.id)
            events: list[dict[str, Any]] = []
            done = await sdq.wait(job.id, timeout=TIMEOUT, on_event=events.append)
            assert done.state == "cancelled" and events[-1]["state"] == "cancelled"
            # a queued one: WaitTimeout, on time
            with pytest.raises(http.WaitTimeout):
                await sdq.wait(img.id, timeout=0.2)
            with pytest.raises(http.NotFound):
                await sdq.get(str(uuid.uuid4()))
            for other in (*batch, img):
                await sdq.cancel(other.id)

    anyio.run(main)


def test_the_client_loads_no_sqlalchemy_and_agrees_with_the_request_bounds():
    from models.request import MAX_IMAGE_BYTES

    assert http.MAX_IMAGE_BYTES == MAX_IMAGE_BYTES
    probe = ("import sys, producer.http\n"
             "print(sorted({m.split('.')[0] for m in sys.modules} & {'sqlalchemy', 'redis', 'celery', 'kombu', 'PIL', "
             "'numpy', 'torch', 'worker', 'pydantic', 'boto3'}))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
