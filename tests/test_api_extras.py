"""What users of the HTTP API expect beyond the basics (issue 15): docs pages that work offline,
`Prefer: wait=N` on a submit, webhooks with fetchable image URLs and a choice of ends, and an
allow-list of private webhook receivers. Against the real Redis, PostgreSQL and S3 server."""

from __future__ import annotations

import hashlib
import json
import re
import time
from urllib.parse import urljoin, urlsplit

import httpx

from tests.conftest import small
from tests.test_api import api, bearer, make_key, serving  # noqa: F401  (fixtures)

TIMEOUT = 120


def test_docs_and_redoc_are_served_from_the_api_itself(api):
    with httpx.Client(base_url=api, timeout=30) as http:
        for page in ("/docs", "/redoc"):
            answer = http.get(page)
            assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/html"), page
            html = answer.text
            # every URL the page names is on this host: a script, a style sheet, the favicon, the schema
            urls = re.findall(r"""(?:src|href)=["']([^"']+)["']|(?:url|spec-url)\s*[:=]\s*["']([^"']+)["']""", html)
            urls = [a or b for a, b in urls]
            assert urls, html
            assert not re.search(r"https?://", html), re.findall(r"https?://\S+", html)
            assets = [url for url in urls if url.endswith((".js", ".css"))]
            assert assets, (page, urls)
            for url in urls:
                full = urljoin(api + page, url)
                assert urlsplit(full).netloc == urlsplit(api).netloc, url
                fetched = http.get(full)
                assert fetched.status_code == 200 and fetched.content, (page, url, fetched.status_code)
            if page == "/docs":
                assert '"validatorUrl": null' in html  # no badge image from swagger.io
                assert any(u.endswith("swagger-ui-bundle.js") for u in urls) and any(u.endswith(".css") for u in urls)
            else:
                assert any(u.endswith("redoc.standalone.js") for u in urls)
        assert http.get("/docs/assets/swagger-ui-bundle.js").headers["content-type"].startswith(
            ("application/javascript", "text/javascript"))
        assert "/docs/assets" not in http.get("/openapi.json").text


# -- Prefer: wait=N ------------------------------------------------------------------------------

def test_prefer_wait_answers_with_the_ended_job(api, make_key, worker):
    token = make_key()
    with httpx.Client(base_url=api, headers=bearer(token), timeout=TIMEOUT) as http:
        answer = http.post("/v1/jobs", json=small(prompt="a green kite", seed=11),
                           headers={"Prefer": "return=minimal, wait=100", "Idempotency-Key": "kite-1"})
        assert answer.status_code == 200, answer.text
        assert answer.headers["preference-applied"] == "wait=100"
        record = answer.json()
        assert record["state"] == "succeeded" and len(record["images"]) == 1
        assert answer.headers["location"] == record["links"]["self"]
        assert http.get(record["links"]["self"]).json() == record
        # a retry with the same Idempotency-Key: the same job, ended, no second one
        again = http.post("/v1/jobs", json=small(prompt="a green kite", seed=11),
                          headers={"Prefer": "wait=5", "Idempotency-Key": "kite-1"})
        assert again.status_code == 200 and again.json()["id"] == record["id"]
        assert again.headers["preference-applied"] == "wait=5"


def test_prefer_wait_answers_201_with_the_record_when_the_job_has_not_ended(api, make_key):
    token = make_key()
    with httpx.Client(base_url=api, headers=bearer(token), timeout=TIMEOUT) as http:
        started = time.monotonic()
        answer = http.post("/v1/jobs", json=small(prompt="a slow snail"), headers={"Prefer": "wait=1"})
        assert time.monotonic() - started >= 1
        assert answer.status_code == 201 and answer.json()["state"] == "queued"  # no worker runs
        assert answer.headers["preference-applied"] == "wait=1"
        # no wait asked, or one that is not a whole number of seconds: answered at once, as always
        for prefer in (None, "wait=0", "wait=-3", "wait=1.5", "wait=soon", "respond-async"):
            started = time.monotonic()
            answer = http.post("/v1/jobs", json=small(prompt="a snail"), headers={"Prefer": prefer} if prefer else {})
            assert answer.status_code == 201 and "preference-applied" not in answer.headers, prefer
            assert time.monotonic() - started < 1, prefer
        # a refused submit is refused at once, whatever it prefers
        refused = http.post("/v1/jobs", json=small(prompt=""), headers={"Prefer": "wait=30"})
        assert refused.status_code == 422 and "preference-applied" not in refused.headers


def test_prefer_wait_is_bounded():
    from producer.api.events import MAX_WAIT_SECONDS, preferred_wait

    assert MAX_WAIT_SECONDS == 300
    assert preferred_wait("wait=10") == 10 and preferred_wait(' respond-async , Wait = "7" ; x=1') == 7
    assert preferred_wait("wait=100000") == 300
    asked_none = (None, "", "wait", "wait=", "wait=0", "wait=١٢", "handling=lenient")
    assert [preferred_wait(prefer) for prefer in asked_none] == [None] * len(asked_none)


# -- webhooks: presigned image URLs, the ends asked for, the allow-list ------------------------------

def test_webhooks_carry_presigned_image_urls_and_only_the_ends_asked_for(make_key, worker, settings):
    from models.db import Database
    from models.settings import load_settings
    from models.storage import open_storage
    from producer.webhooks import Deliverer
    from tests.test_webhooks import Receiver

    hook = Receiver()
    # the receiver is on loopback: allowed by name in SDQUEUE_WEBHOOK_ALLOW, not by ALLOW_PRIVATE
    allowing = load_settings(webhook_allow="127.0.0.0/8", webhook_url_seconds=600)
    token = make_key()
    try:
        with serving(allowing) as url, httpx.Client(base_url=url, headers=bearer(token), timeout=TIMEOUT) as http:
            # 1. the ends asked for are named and checked; without webhook_events every end is
            wanted = http.post("/v1/jobs", headers={"Prefer": "wait=100"}, json=small(
                prompt="a paper boat", webhook_url=hook.url, webhook_events=["succeeded"]))
            unwanted = http.post("/v1/jobs", headers={"Prefer": "wait=100"}, json=small(
                prompt="a paper plane", webhook_url=hook.url, webhook_events=["failed", "cancelled"]))
            assert wanted.status_code == unwanted.status_code == 200, (wanted.text, unwanted.text)
            assert wanted.json()["webhook"]["events"] == ["succeeded"]
            assert unwanted.json()["webhook"]["events"] == ["failed", "cancelled"]
            form = http.post("/v1/jobs", data={"prompt": "a kite", "width": "256", "height": "256",
                                               "num_inference_steps": "3", "webhook_url": hook.url,
                                               "webhook_events": "cancelled, failed"})
            assert form.status_code == 201 and form.json()["webhook"]["events"] == ["failed", "cancelled"], form.text
            for fields, named in (({"webhook_events": ["done"]}, "'done' is not one of succeeded, failed, cancelled"),
                                  ({"webhook_events": []}, "must be a list of one or more"),
                                  ({"webhook_events": 5}, "must be a list"),
                                  ({"webhook_url": None, "webhook_events": ["failed"]}, "without a webhook_url")):
                refused = http.post("/v1/jobs", json=small(prompt="a cat", **{"webhook_url": hook.url, **fields}))
                assert refused.status_code == 422 and named in " ".join(refused.json()["detail"]), refused.text
            batch = http.post("/v1/jobs:batch", json={"requests": [small(prompt="a")], "webhook_url": hook.url,
                                                      "webhook_events": ["cancelled"]})
            assert batch.status_code == 201 and batch.json()["jobs"][0]["webhook"]["events"] == ["cancelled"]
            http.delete(batch.json()["jobs"][0]["links"]["self"])
        done, skipped = wanted.json(), unwanted.json()
        # 2. an end not asked for makes no delivery; one asked for does, delivered as `sdqueue webhooks` does
        db = Database(settings.database_url)
        storage = open_storage(allowing.storage_url, endpoint_url=allowing.s3_endpoint_url, region=allowing.s3_region)
        deliverer = Deliverer(allowing, db, locate=storage.location,
                              sign_url=lambda key: storage.presigned_url(key, allowing.webhook_url_seconds))
        from sqlalchemy import select

        from models.tables import WebhookDelivery

        with db.session() as session:
            rows = {row.job_id: row.id for row in session.scalars(
                select(WebhookDelivery).where(WebhookDelivery.job_id.in_([done["id"], skipped["id"]])))}
        assert list(rows) == [done["id"]]
        assert deliverer.deliver(rows[done["id"]], 1) == "delivered"
        [(_, body, _)] = hook.posts
        posted = json.loads(body)
        assert posted["id"] == done["id"] and posted["state"] == "succeeded"
        # 3. each image with a URL anyone holding it can GET, valid SDQUEUE_WEBHOOK_URL_SECONDS
        [image] = posted["images"]
        assert image["location"].startswith("s3://") and "X-Amz-Expires=600" in image["url"]
        png = httpx.get(image["url"], timeout=30)
        assert png.status_code == 200 and hashlib.sha256(png.content).hexdigest() == image["sha256"]
        db.dispose()
    finally:
        hook.close()


def test_the_allow_list_lets_only_its_private_receivers_in(monkeypatch):
    import pytest

    from models import webhooks
    from models.errors import ConfigError, InvalidRequest
    from models.settings import load_settings
    from producer.webhooks import post
    from tests.test_webhooks import Receiver

    check = webhooks.check_webhook_url
    # networks (CIDR or one address) and exact host names
    assert check("http://127.0.0.1:9/hook", allow_private=False, allow=["127.0.0.0/8"])
    assert check("http://[::ffff:127.0.0.1]/hook", allow_private=False, allow=["127.0.0.1"])
    assert check("http://10.1.2.3/hook", allow_private=False, allow=["10.1.0.0/16"])
    assert check("http://localhost:9/hook", allow_private=False, allow=["LOCALHOST."])  # whatever it resolves to
    assert check("http://[::1]/hook", allow_private=False, allow=["::1/128"])
    for url, allow in (("http://10.2.0.1/hook", ["10.1.0.0/16", "127.0.0.1"]),  # another private address
                       ("http://[::1]/hook", ["127.0.0.0/8"]),
                       ("http://169.254.169.254/latest/meta-data", ["metadata.internal"])):
        with pytest.raises(InvalidRequest, match="SDQUEUE_WEBHOOK_ALLOW, or set SDQUEUE_WEBHOOK_ALLOW_PRIVATE"):
            check(url, allow_private=False, allow=allow)
    assert check("http://10.2.0.1/hook", allow_private=True, allow=["10.1.0.0/16"])  # all or nothing still works
    # the setting, read from the environment and checked at start
    monkeypatch.setenv("SDQUEUE_WEBHOOK_ALLOW", " 10.0.0.0/8, hooks.internal ,fd00::/8,")
    assert load_settings().webhook_allow_list == ("10.0.0.0/8", "hooks.internal", "fd00::/8")
    for bad in ("10.0.0.0/33", "hooks internal", "http://hooks.internal"):
        monkeypatch.setenv("SDQUEUE_WEBHOOK_ALLOW", bad)
        with pytest.raises(ConfigError, match="SDQUEUE_WEBHOOK_ALLOW="):
            load_settings()
    # the deliverer checks again before each POST, with the same list
    hook = Receiver()
    try:
        prepared = webhooks.Prepared(1, 1, hook.url, b'{"id":"j1"}', None)
        refused = post(prepared, timeout=5, allow_private=False, allow=("10.0.0.0/8",))
        assert refused.status_code is None and "a loopback address" in refused.error and not hook.posts
        assert post(prepared, timeout=5, allow_private=False, allow=("127.0.0.1",)).status_code == 200
        assert len(hook.posts) == 1
    finally:
        hook.close()
