"""Webhooks: signatures, URL rules, the delivery row made with a job's end, and `sdqueue webhooks`
POSTing to a real HTTP receiver on loopback, against the real PostgreSQL and Redis."""

from __future__ import annotations

import hashlib
import json
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest
from sqlalchemy import select

from models import jobs, webhooks
from models.db import Database, upgrade
from models.errors import InvalidRequest
from models.tables import ApiKey, Job, WebhookAttempt, WebhookDelivery
from tests.conftest import settle_jobs, small, wait_for
from tests.servers import free_port

ROOT = Path(__file__).resolve().parents[1]
SECRET = "whsec_" + "ab" * 16


# 1. signatures


def test_a_signature_verifies_only_the_same_body_secret_and_a_recent_time():
    body, now = b'{"id":"j1","state":"succeeded"}', 1_800_000_000
    header = webhooks.sign(SECRET, body, now)
    assert header.startswith(f"t={now},v1=") and len(header.partition("v1=")[2]) == 64
    assert webhooks.verify(SECRET, body, header, now=now + 10)
    assert not webhooks.verify(SECRET, body.replace(b"succeeded", b"failed"), header, now=now)  # tampered body
    assert not webhooks.verify("whsec_other", body, header, now=now)  # wrong secret
    assert not webhooks.verify(SECRET, body, header, now=now + 301)  # replayed later
    assert not webhooks.verify(SECRET, body, header, now=now - 301)  # from the future
    assert webhooks.verify(SECRET, body, header, now=now + 3000, tolerance=3600)
    other_time = header.replace(f"t={now}", f"t={now + 1}")  # the time is signed too
    assert not webhooks.verify(SECRET, body, other_time, now=now)
    rotated = f"{header},v1={'0' * 64}"  # any v1 may match: secrets rotate
    assert webhooks.verify(SECRET, body, rotated, now=now)
    for broken in ("", "t=,v1=", f"v1={header.partition('v1=')[2]}", f"t={now}", "garbage", f"t=x{now},v1=ü"):
        assert not webhooks.verify(SECRET, body, broken, now=now), broken


# 2. URL rules


@pytest.mark.parametrize("url, rule", [
    ("http://127.0.0.1:8080/hook", "resolves to 127.0.0.1, a loopback address"),
    ("http://localhost/hook", "a loopback address"),  # a name that resolves to loopback
    ("http://10.1.2.3/hook", "resolves to 10.1.2.3, a private address"),
    ("http://192.168.0.7/hook", "a private address"),
    ("http://169.254.169.254/latest/meta-data", "resolves to 169.254.169.254, a link-local address"),
    ("http://[::1]:9000/hook", "resolves to ::1, a loopback address"),
    ("http://[::ffff:127.0.0.1]/hook", "a loopback address"),
    ("http://0.0.0.0/hook", "an unspecified address"),
    ("http://2130706433/hook", "resolves to 127.0.0.1, a loopback address"),  # 127.0.0.1 as a number
    ("http://224.0.0.1/hook", "a multicast address"),
    ("http://100.64.0.1/hook", "not a public address"),  # carrier-grade NAT
])
def test_urls_that_reach_this_network_are_refused_unless_allowed(url, rule):
    with pytest.raises(InvalidRequest) as refused:
        webhooks.check_webhook_url(url, allow_private=False)
    message = str(refused.value)
    assert f"webhook_url={url!r}: " in message and rule in message, message
    assert "set SDQUEUE_WEBHOOK_ALLOW_PRIVATE=true to allow it" in message
    assert webhooks.check_webhook_url(url, allow_private=True) == url


@pytest.mark.parametrize("url, rule", [
    ("ftp://93.184.216.34/hook", "scheme must be http or https"),
    ("file:///etc/passwd", "scheme must be http or https"),
    ("gopher://93.184.216.34:70/", "scheme must be http or https"),
    ("93.184.216.34/hook", "scheme must be http or https"),
    ("http:///hook", "has no host"),
    ("http://93.184.216.34:99999/", "not a URL"),
    ("http://no-such-host.invalid/hook", "does not resolve"),
    ("https://93.184.216.34/" + "a" * 2048, "at most 2048"),
])
def test_urls_that_are_not_http_are_refused_even_when_private_is_allowed(url, rule):
    with pytest.raises(InvalidRequest, match="webhook_url") as refused:
        webhooks.check_webhook_url(url, allow_private=True)
    assert rule in str(refused.value)


def test_public_addresses_pass():
    for url in ("http://93.184.216.34/hook", "https://[2606:4700::1111]:8443/a?b=c", "https://8.8.8.8"):
        assert webhooks.check_webhook_url(url, allow_private=False) == url


def test_the_deliverer_loads_no_torch():
    from tests.test_layout import loaded_after

    assert loaded_after("import models.webhooks, producer.webhooks, producer.cli") == []


# 3. fixtures: the real Redis and PostgreSQL; file storage and no model (webhooks need neither)


@pytest.fixture
def settled(postgres_url: str) -> Iterator[None]:
    """Afterwards, no delivery of this test is left pending in the session's database, for the
    deliverers of the next tests to POST to receivers that are gone."""
    yield
    from sqlalchemy import update

    db = Database(postgres_url)
    with db.session() as session:
        session.execute(update(WebhookDelivery).where(WebhookDelivery.state == "pending").values(state="failed"))
    db.dispose()


@pytest.fixture
def settings_env(redis_url: str, postgres_url: str, settled: None, tmp_path: Path,
                 monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    tag = uuid.uuid4().hex[:10]
    env = {
        "SDQUEUE_BROKER_URL": redis_url,
        "SDQUEUE_DATABASE_URL": postgres_url,
        "SDQUEUE_STORAGE_URL": (tmp_path / "storage").as_uri(),
        "SDQUEUE_DATA_DIR": str(tmp_path),
        "SDQUEUE_QUEUE": f"test-{tag}",
        "SDQUEUE_MODEL": "tiny",  # the model the tests' claims say they run
        "SDQUEUE_WEBHOOK_ALLOW_PRIVATE": "true",  # the receiver is on loopback
        "SDQUEUE_WEBHOOK_RETRY_SECONDS": "60",
        "SDQUEUE_WEBHOOK_TIMEOUT": "5",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    yield env
    import redis

    settle_jobs(postgres_url, env["SDQUEUE_QUEUE"])  # no later test's sweeper sends their messages again
    broker = redis.Redis.from_url(redis_url)  # this test's own queues only: other sessions share the database
    for key in broker.scan_iter(match=f"*{tag}*"):
        broker.delete(key)
    broker.close()


@pytest.fixture
def settings(settings_env):  # type: ignore[no-untyped-def]
    from models.settings import load_settings

    return load_settings()


class Receiver:
    """An HTTP server on loopback that records every POST and answers with `answers` in turn
    (200 once they run out), each after `delay` seconds."""

    def __init__(self, answers: tuple[int, ...] = (), delay: float = 0.0):
        self.answers = list(answers)
        self.delay = delay
        self.posts: list[tuple[dict[str, str], bytes, float]] = []
        lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with lock:
                    receiver.posts.append((dict(self.headers), body, time.monotonic()))
                    code = receiver.answers.pop(0) if receiver.answers else 200
                time.sleep(receiver.delay)
                self.send_response(code)
                self.send_header("Content-Length", "4")
                self.end_headers()
                self.wfile.write(b"nope" if code >= 300 else b"okay")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Dripper:
    """A receiver on loopback that reads each request, then answers one byte every `interval`
    seconds, forever: a status line, then a header that never ends. Each read of its answer gets a
    byte in time; only a deadline on the whole answer ends a POST to it."""

    def __init__(self, interval: float = 1.0):
        self.interval = interval
        self.accepted = 0
        self.hung_up = 0  # connections the client closed while we were still answering
        self.stopping = threading.Event()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}/hook"
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                connection, _ = self.server.accept()
            except (TimeoutError, OSError):
                continue
            self.accepted += 1
            thread = threading.Thread(target=self._drip, args=(connection,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _drip(self, connection: socket.socket) -> None:
        with connection:
            connection.settimeout(10)
            request = b""
            try:
                while b"\r\n\r\n" not in request:
                    chunk = connection.recv(65536)
                    if not chunk:
                        return
                    request += chunk
            except OSError:
                return
            answer = b"HTTP/1.1 200 OK\r\nX-Drip: "
            sent = 0
            while not self.stopping.is_set():
                try:
                    connection.sendall(answer[sent:sent + 1] or b"a")
                except OSError:  # the client closed the connection
                    self.hung_up += 1
                    return
                sent += 1
                self.stopping.wait(self.interval)

    def close(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=5)
        self.server.close()


@pytest.fixture
def dripper() -> Iterator[Any]:
    made: list[Dripper] = []

    def make(interval: float = 1.0) -> Dripper:
        made.append(Dripper(interval))
        return made[-1]

    yield make
    for d in made:
        d.close()


@pytest.fixture
def receiver() -> Iterator[Any]:
    made: list[Receiver] = []

    def make(answers: tuple[int, ...] = (), delay: float = 0.0) -> Receiver:
        made.append(Receiver(answers, delay))
        return made[-1]

    yield make
    for r in made:
        r.close()


def make_key(db: Database) -> ApiKey:
    token = secrets.token_urlsafe(32)
    key = ApiKey(id=str(uuid.uuid4()), name=f"test-{uuid.uuid4().hex[:8]}", token_sha256=hashlib.sha256(token.encode()).hexdigest(),
                 token_prefix=token[:8], webhook_secret="whsec_" + secrets.token_hex(24))
    with db.session() as session:
        session.add(key)
    return key


def submit_with_webhook(client: Any, url: str | None, key: ApiKey | None = None) -> str:
    """A job as the HTTP API makes it: submitted, with its key and webhook URL."""
    job_id = client.submit(small(prompt="a lighthouse"))
    with client.db.session() as session:
        job = jobs.get_job(session, job_id)
        job.webhook_url, job.api_key_id = url, key.id if key else None
    return job_id


def succeed(db: Database, job_id: str) -> None:
    """Claimed and ended by a worker, with no images."""
    with db.session() as session:
        job, why = jobs.claim(session, job_id, "test-worker", "tiny", lease_seconds=30, max_attempts=3)
        assert job is not None, why
        jobs.succeed(session, jobs.lease_of(job), [])


def deliveries(db: Database, job_id: str) -> list[WebhookDelivery]:
    with db.session() as session:
        return list(session.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id == job_id)))


def tries(db: Database, delivery_id: int) -> list[WebhookAttempt]:
    with db.session() as session:
        return list(session.scalars(select(WebhookAttempt).where(WebhookAttempt.delivery_id == delivery_id)
                                    .order_by(WebhookAttempt.id)))


# 4. the delivery row, made with the job's end


def test_every_end_of_a_job_makes_exactly_one_delivery(client):
    db, url = client.db, "http://127.0.0.1:9/hook"
    succeeded, cancelled, failed = (submit_with_webhook(client, url) for _ in range(3))
    plain = submit_with_webhook(client, None)
    assert client.get(succeeded)["webhook"] == {"url": url, "events": ["succeeded", "failed", "cancelled"],
                                                "state": None, "attempts": 0, "next_attempt_at": None,
                                                "finished_at": None, "tries": []}  # not ended yet
    assert deliveries(db, succeeded) == []
    # ended by a worker, by a cancel, by its last failed attempt (dead-lettered)
    succeed(db, succeeded)
    client.cancel(cancelled)
    with db.session() as session:
        job, _ = jobs.claim(session, failed, "test-worker", "tiny", lease_seconds=30, max_attempts=1)
        assert job is not None and jobs.charge(session, jobs.lease_of(job), "boom", max_attempts=1) is False
    succeed(db, plain)
    for job_id, state in ((succeeded, "succeeded"), (cancelled, "cancelled"), (failed, "failed")):
        [delivery] = deliveries(db, job_id)
        assert (delivery.url, delivery.state, delivery.attempts) == (url, "pending", 0)
        record = client.get(job_id)
        assert record["state"] == state
        assert record["webhook"]["state"] == "pending" and record["webhook"]["next_attempt_at"] is not None
        assert record["finished_at"] == delivery.created_at.isoformat()  # in the same transaction
    assert deliveries(db, plain) == [] and client.get(plain)["webhook"] is None
    # a job ends once; an end that is refused adds nothing
    with pytest.raises(jobs.IllegalTransition):
        client.cancel(succeeded)
    assert len(deliveries(db, succeeded)) == 1


def test_the_python_client_asks_for_chosen_ends_and_checks_them(client):
    url = "http://127.0.0.1:9/hook"
    job_id = client.submit(small(prompt="a paper boat"), webhook_url=url, webhook_events=["cancelled"])
    [kite] = client.submit_many([small(prompt="a kite")], webhook_url=url, webhook_events=["failed", "succeeded"])
    assert client.get(job_id)["webhook"]["events"] == ["cancelled"]
    assert client.get(kite)["webhook"]["events"] == ["succeeded", "failed"]  # in the order of every end
    before = job_total(client.db)
    for events, hook, said in ((["done"], url, "'done' is not one of"), (["failed"], None, "without a webhook_url")):
        with pytest.raises(InvalidRequest, match=said):
            client.submit(small(prompt="a paper plane"), webhook_url=hook, webhook_events=events)
        with pytest.raises(InvalidRequest, match=said):
            client.submit_many([small(prompt="a paper plane")], webhook_url=hook, webhook_events=events)
    assert job_total(client.db) == before  # nothing written


def job_total(db: Database) -> int:
    from sqlalchemy import func

    with db.session() as session:
        return session.scalar(select(func.count()).select_from(Job))


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Iterator[Database]:
    url = f"sqlite:///{tmp_path / 'webhooks.db'}"
    upgrade(url)
    db = Database(url)
    yield db
    db.dispose()


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_a_try_is_made_once_whatever_the_messages(backend, request, receiver, tmp_path):
    """In process, no Celery: scan, a duplicate message, a 410, on both databases."""
    from models.settings import load_settings
    from producer.webhooks import Deliverer

    if backend == "postgresql":
        request.getfixturevalue("settled")
        db = Database(request.getfixturevalue("postgres_url"))
        request.addfinalizer(db.dispose)
    else:
        db = request.getfixturevalue("sqlite_db")
    settings = load_settings(webhook_allow_private=True, data_dir=tmp_path)
    deliverer = Deliverer(settings, db)
    hook = receiver(answers=(500, 410))
    key = make_key(db)
    job_id = str(uuid.uuid4())
    with db.session() as session:
        session.add(Job(id=job_id, mode="txt2img", params={"prompt": "x"}, seed=1, width=256, height=256,
                        num_inference_steps=1, num_images=1, webhook_url=hook.url, api_key_id=key.id))
    with db.session() as session:
        jobs.cancel(session, job_id)
    # the scan sends one message per due delivery, and marks it in flight
    sent: list[tuple[int, int]] = []
    deliverer.scan(lambda *message: sent.append(message))
    [(delivery_id, attempt)] = [m for m in sent if m[0] == deliveries(db, job_id)[0].id]
    assert attempt == 1
    deliverer.scan(lambda *message: sent.append(message))
    assert sent.count((delivery_id, 1)) == 1  # in flight: not sent again
    # the message twice: one POST
    assert deliverer.deliver(delivery_id, 1) == "pending"  # 500: again later
    assert deliverer.deliver(delivery_id, 1) == "skipped"
    assert len(hook.posts) == 1
    headers, body, _ = hook.posts[0]
    assert headers["X-Sdqueue-Delivery"] == str(delivery_id) and headers["X-Sdqueue-Attempt"] == "1"
    assert webhooks.verify(key.webhook_secret, body, headers["X-Sdqueue-Signature"])
    assert json.loads(body)["state"] == "cancelled" and "webhook" not in json.loads(body)
    # 410 Gone: the receiver says stop
    assert deliverer.deliver(delivery_id, 2) == "failed"
    assert deliverer.deliver(delivery_id, 3) == "skipped"
    assert [(t.status_code, t.error) for t in tries(db, delivery_id)] == [
        (500, "HTTP 500 Internal Server Error: nope"), (410, "HTTP 410 Gone: nope")]


def test_a_url_that_now_resolves_to_a_private_address_is_not_posted_to(client, receiver):
    from producer.webhooks import Deliverer

    hook = receiver()
    job_id = submit_with_webhook(client, hook.url)
    succeed(client.db, job_id)
    [delivery] = deliveries(client.db, job_id)
    strict = client.settings.model_copy(update={"webhook_allow_private": False})
    assert Deliverer(strict, client.db).deliver(delivery.id, 1) == "pending"
    assert hook.posts == []
    [attempt] = tries(client.db, delivery.id)
    assert attempt.status_code is None and "a loopback address" in attempt.error


def test_a_receiver_answering_a_byte_at_a_time_is_cut_off_at_the_deadline(dripper):
    from producer.webhooks import post

    slow = dripper(interval=0.5)  # every read gets a byte well within the timeout
    outcome = post(webhooks.Prepared(1, 1, slow.url, b'{"id":"j1"}', None), timeout=2, allow_private=True)
    assert outcome.status_code is None and not outcome.delivered
    assert outcome.error == "Timeout: no complete answer within 2 s (SDQUEUE_WEBHOOK_TIMEOUT)"
    assert 2 - 0.1 <= outcome.seconds < 30  # the deadline, not the receiver, ended it
    wait_for(lambda: slow.hung_up == 1, timeout=30)  # and the connection was closed, not left dripping


# 5. `sdqueue webhooks`, the real command, in processes of its own


@contextmanager
def deliverer_process(log: Path, concurrency: int = 4) -> Iterator[subprocess.Popen]:
    """`sdqueue webhooks`, with this test's SDQUEUE_* environment; stopped with SIGTERM."""
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "producer.cli", "webhooks", "--concurrency", str(concurrency)],
                                   cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def state_of(db: Database, job_id: str, *states: str) -> WebhookDelivery | None:
    found = deliveries(db, job_id)
    return found[0] if found and found[0].state in states else None


def test_the_deliverer_retries_with_back_off_until_the_receiver_accepts(client, receiver, tmp_path):
    hook = receiver(answers=(500, 500))
    key = make_key(client.db)
    job_id = submit_with_webhook(client, hook.url, key)
    with deliverer_process(tmp_path / "webhooks.log"):
        succeed(client.db, job_id)
        delivery = wait_for(lambda: state_of(client.db, job_id, "delivered", "failed"), timeout=30, step=0.1)
    log = (tmp_path / "webhooks.log").read_text()
    assert delivery.state == "delivered", log
    # three POSTs of the same signed body, the second 1 s after the first, the third 2 s after that
    assert len(hook.posts) == 3, log
    record = client.get(job_id)
    expected = {k: v for k, v in record.items() if k != "webhook"}
    for number, (headers, body, _) in enumerate(hook.posts, 1):
        assert headers["Content-Type"] == "application/json"
        assert headers["X-Sdqueue-Delivery"] == str(delivery.id) and headers["X-Sdqueue-Attempt"] == str(number)
        assert webhooks.verify(key.webhook_secret, body, headers[webhooks.SIGNATURE_HEADER])
        assert not webhooks.verify("whsec_someone_else", body, headers[webhooks.SIGNATURE_HEADER])
        assert json.loads(body) == expected
        assert body == json.dumps(expected, sort_keys=True, separators=(",", ":")).encode()
    times = [at for _, _, at in hook.posts]
    assert times[1] - times[0] >= 0.9 and times[2] - times[1] >= 1.9
    # the job's record tells how it went
    shown = record["webhook"]
    assert (shown["url"], shown["state"], shown["attempts"], shown["next_attempt_at"]) == (hook.url, "delivered", 3, None)
    assert [t["status_code"] for t in shown["tries"]] == [500, 500, 200]
    assert [t["error"] for t in shown["tries"]] == ["HTTP 500 Internal Server Error: nope"] * 2 + [None]
    assert all(t["seconds"] is not None and t["at"] for t in shown["tries"])


def test_a_receiver_down_longer_than_the_retry_window_fails_the_delivery(client, tmp_path, monkeypatch):
    monkeypatch.setenv("SDQUEUE_WEBHOOK_RETRY_SECONDS", "3")
    down = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens there
    job_id = submit_with_webhook(client, down)  # no key: not signed
    with deliverer_process(tmp_path / "webhooks.log"):
        client.cancel(job_id)
        delivery = wait_for(lambda: state_of(client.db, job_id, "delivered", "failed"), timeout=30, step=0.1)
    log = (tmp_path / "webhooks.log").read_text()
    assert delivery.state == "failed" and delivery.finished_at is not None, log
    made = tries(client.db, delivery.id)
    # 0 s, 1 s, 3 s after the end; under load the deliverer's first try can come after the window
    assert 1 <= len(made) <= 4 and delivery.attempts == len(made), log
    assert all(t.status_code is None and t.error.startswith("ConnectError") for t in made)
    assert (made[-1].at - delivery.created_at).total_seconds() >= 3 - 0.5
    assert client.get(job_id)["webhook"]["state"] == "failed"


def test_two_deliverers_post_each_delivery_once(client, receiver, settings, tmp_path):
    from producer.webhooks import make_app, sender

    hook = receiver(delay=0.3)  # slow answers: tries overlap
    key = make_key(client.db)
    job_ids = [submit_with_webhook(client, hook.url, key) for _ in range(6)]
    with deliverer_process(tmp_path / "a.log"), deliverer_process(tmp_path / "b.log"):
        for job_id in job_ids:
            succeed(client.db, job_id)
        # the first try's message again, several times: what a double scan or a redelivery would send
        send = sender(make_app(settings), settings)
        ids = [wait_for(lambda: deliveries(client.db, job_id), timeout=10)[0].id for job_id in job_ids]
        for delivery_id in ids * 3:
            send(delivery_id, 1)
        wait_for(lambda: all(state_of(client.db, job_id, "delivered") for job_id in job_ids), timeout=30, step=0.1)
        time.sleep(1.5)  # what the duplicates would have POSTed by now
    logs = (tmp_path / "a.log").read_text() + (tmp_path / "b.log").read_text()
    posted = sorted(int(headers["X-Sdqueue-Delivery"]) for headers, _, _ in hook.posts)
    assert posted == sorted(ids), logs
    assert all(len(tries(client.db, delivery_id)) == 1 for delivery_id in ids)
    assert "made already, or the delivery ended" in logs  # the duplicates reached a deliverer, and were dropped


def test_a_slow_receiver_holds_a_slot_only_until_the_deadline(client, receiver, dripper, tmp_path, monkeypatch):
    """Both slots of `--concurrency 2` taken by a receiver that drips its answer: each try ends as a
    failed try at SDQUEUE_WEBHOOK_TIMEOUT and is retried with back-off, and another job's webhook is
    delivered meanwhile (before the deadline it waited forever behind them)."""
    monkeypatch.setenv("SDQUEUE_WEBHOOK_TIMEOUT", "2")
    slow, good = dripper(), receiver()
    slow_ids = [submit_with_webhook(client, slow.url) for _ in range(2)]
    good_id = submit_with_webhook(client, good.url)
    with deliverer_process(tmp_path / "webhooks.log", concurrency=2):
        for job_id in slow_ids:
            succeed(client.db, job_id)
        wait_for(lambda: slow.accepted >= 2, timeout=60, step=0.1)  # both slots held
        succeed(client.db, good_id)
        delivered = wait_for(lambda: state_of(client.db, good_id, "delivered", "failed"), timeout=60, step=0.1)
        slow_deliveries = [deliveries(client.db, job_id)[0] for job_id in slow_ids]

        def tried_twice() -> list[list[WebhookAttempt]] | None:
            made = [tries(client.db, d.id) for d in slow_deliveries]
            return made if all(len(t) >= 2 for t in made) else None

        made = wait_for(tried_twice, timeout=60, step=0.1)
    log = (tmp_path / "webhooks.log").read_text()
    assert delivered.state == "delivered" and len(good.posts) == 1, log
    for first, second, *_ in made:
        # a failed try each, ended by the deadline (seconds are an upper bound only: the machine is loaded)
        for attempt in (first, second):
            assert attempt.status_code is None, log
            assert attempt.error == "Timeout: no complete answer within 2 s (SDQUEUE_WEBHOOK_TIMEOUT)", log
            assert 2 - 0.1 <= attempt.seconds < 30, log
        assert (second.at - first.at).total_seconds() >= 2 + 1 - 0.2  # the deadline, then 1 s of back-off
    assert all(state_of(client.db, job_id, "pending") for job_id in slow_ids)  # still retried, not given up
    wait_for(lambda: slow.hung_up >= 4, timeout=30)  # every cut-off try closed its connection
