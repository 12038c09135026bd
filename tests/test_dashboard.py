"""The web dashboard, in headless Chromium (Debian's `chromium`, driven by Playwright; `make browser`
installs it): a run's job made by a real worker shows on the overview, in the run's gallery and on
its own page, each page screenshotted into test-artifacts/dashboard/ (CI keeps that folder); its
"submit again" makes a job of the same parameters and seed, whose page follows it live to its end.
And the dashboard's keys: with auth on, nothing without one, and with one what the API shows it.
A run of 50 images written into the tables: its compact gallery and records, keyset pages, times
in the viewer's zone, the jobs searched, pages that follow a job's state, and who sees which run."""

from __future__ import annotations

import json
import shutil
import struct
import time
import uuid
from contextlib import contextmanager
from datetime import timedelta, timezone
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlencode

import httpx
import numpy as np
import pytest
from sqlalchemy import select

from tests.conftest import small, wait_for
from tests.test_api import bearer, make_key, serving  # noqa: F401  (make_key: a fixture)
from tests.test_end_to_end import pixels, s3_object

ROOT = Path(__file__).resolve().parents[1]
# Where the screenshots go: CI saves this folder as the run's artifacts.
ARTIFACTS = ROOT / "test-artifacts" / "dashboard"
TIMEOUT = 120
VIEWPORT = {"width": 1280, "height": 1400}  # tall enough that a run's first gallery row is in view
# Steps of the job followed live: the tiny model takes about 30 ms a step on a CPU core, so it runs
# for some seconds, and the page sees it part way.
LIVE_STEPS = 120


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    """The system's Chromium under Playwright (no `playwright install`: no browser downloads)."""
    path = shutil.which("chromium")
    if path is None:
        pytest.fail("chromium is not installed: `make browser` (deploy/dev-browser.sh) installs Debian's package")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=path, headless=True)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS.glob("*.png"):
        old.unlink()
    return ARTIFACTS


def shoot(page: Any, folder: Path, name: str) -> Path:
    """A full-page screenshot, checked to be a real PNG of the page's width."""
    path = folder / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, (path, len(data))
    width, height = struct.unpack(">II", data[16:24])
    assert width == VIEWPORT["width"] and height >= 300, (path, width, height)
    return path


def poll(page: Any, script: str, arg: Any = None, timeout: float = 30) -> Any:
    """Evaluate `script` in the page until it gives something true; that value. (Not Playwright's
    wait_for_function: it evaluates a string, which the pages' Content-Security-Policy forbids.)"""
    from playwright.sync_api import Error

    def once() -> Any:
        try:
            return page.evaluate(script, arg)
        except Error as exc:  # the page is being read again (the job page does at its job's end)
            if "context was destroyed" in str(exc) or "navigat" in str(exc):
                return None
            raise

    return wait_for(once, timeout=timeout, step=0.1)


def images_loaded(page: Any, selector: str) -> list[int]:
    """Wait until every image matched has loaded; their natural widths."""
    return poll(page, "s => { const all = [...document.querySelectorAll(s)];"  # type: ignore[no-any-return]
                      " return all.length > 0 && all.every(i => i.complete && i.naturalWidth > 0)"
                      " && all.map(i => i.naturalWidth); }", selector)


def run_job_ids(client: Any, name: str) -> list[str]:
    from models.tables import Job, Run

    with client.db.session() as session:
        return list(session.scalars(select(Job.id).join(Run, Run.id == Job.run_id).where(Run.name == name)))


def test_dashboard_pages_in_chromium(settings, client, worker, chromium, artifacts, tmp_path):
    from models.settings import load_settings
    from producer.cli import main

    # 1. a run of one job (two images) through `sdqueue run`, made by the real worker
    name = f"dashboard-{time.time_ns()}"
    prompt = "a lighthouse on a cliff at dusk, oil painting"
    manifest = tmp_path / "prompts.jsonl"
    manifest.write_text(json.dumps({"prompt": prompt, "seed": 4242, "num_images": 2, "guidance_scale": 6.5}) + "\n")
    assert main(["run", str(manifest), "--name", name, "--width", "256", "--height", "256",
                 "--num-inference-steps", "3"]) == 0
    [job_id] = run_job_ids(client, name)
    done = client.wait(job_id, timeout=TIMEOUT)
    assert done["state"] == "succeeded", done["error"]

    open_settings = load_settings(api_auth="off")
    with serving(open_settings) as url:
        page = chromium.new_page(viewport=VIEWPORT)
        # 2. the overview: queues, job counts, workers, the run with its bar, the job among the recent
        assert page.goto(f"{url}/").status == 200
        assert page.locator("#queues td code").first.inner_text() == f"{settings.queue}.tiny"
        run_row = page.locator("#runs tr", has=page.locator(f"a[href='/runs/{name}']"))
        assert run_row.locator(".bar .succeeded").count() == 1 and "1/1" in run_row.inner_text()
        recent = page.locator("#recent tr", has=page.locator(f"a[href='/jobs/{job_id}']"))
        assert prompt in recent.inner_text() and "succeeded" in recent.inner_text()
        if has_worker_registry():  # the worker publishes its status every SDQUEUE_STATUS_INTERVAL
            wait_for(lambda: workers_shown(page), timeout=30, step=0.5)
        shoot(page, artifacts, "overview")

        # 3. the run: its progress and its gallery, each image's record with its provenance on a click
        page.locator(f"#runs a[href='/runs/{name}']").click()
        page.wait_for_url(f"{url}/runs/{name}")
        assert f"Run {name}" in page.locator("h1").inner_text()
        cards = page.locator(".gallery details.card")
        assert cards.count() == 2
        assert images_loaded(page, ".gallery .card summary img") == [256, 256]  # thumbnails of 256x256 images
        assert cards.nth(0).inner_text().strip() == prompt  # the card: its thumbnail and prompt
        cards.nth(0).locator("summary").click()
        first = cards.nth(0).locator(".record").inner_text()
        assert prompt in first and job_id[:8] in first and "4242" in first and "6.5" in first
        for label in ("model", "revision", "scheduler", "batch", "sha256"):
            assert cards.nth(0).locator("dt", has_text=label).count() >= 1, label
        assert cards.nth(0).locator("dd.model").inner_text() == "tiny"  # the registry's name, not the folder
        shoot(page, artifacts, "run")
        cards.nth(1).locator("summary").click()  # one record open at a time
        assert "4243" in cards.nth(1).locator(".record").inner_text()  # image 1: seed + 1
        assert not cards.nth(0).locator(".record").is_visible()

        # 4. the job: its parameters, images and their provenance
        assert page.goto(f"{url}/jobs/{job_id}").status == 200
        assert page.locator("#job-id").inner_text() == job_id and page.locator("#state").inner_text() == "succeeded"
        assert prompt in page.locator("#parameters").inner_text()
        assert images_loaded(page, ".gallery .card img") == [256, 256]
        shoot(page, artifacts, "job")

        # 5. a job followed live: its page's bar moves with the worker's steps, then shows its image
        live_id = client.submit(small(prompt="a slow sunrise", num_inference_steps=LIVE_STEPS, seed=5))
        assert page.goto(f"{url}/jobs/{live_id}").status == 200
        step = poll(page, "() => { const bar = document.getElementById('progress');"
                          " return bar && bar.value > 0 && document.getElementById('step').textContent; }",
                    timeout=TIMEOUT)
        assert step.startswith("step ") and step.endswith(f" of {LIVE_STEPS}"), step
        assert page.locator("#state").inner_text() == "running"
        shoot(page, artifacts, "live")
        poll(page, "() => document.getElementById('state').textContent === 'succeeded'", timeout=TIMEOUT)
        assert images_loaded(page, ".gallery .card img") == [256]

        # 6. submit again, from the run's gallery: a new job, its page following it to its end
        page.goto(f"{url}/runs/{name}")
        page.locator(".gallery details.card").nth(0).locator("summary").click()
        with page.expect_navigation():
            page.locator(".gallery details.card").nth(0).locator("button", has_text="submit again").click()
        again_id = page.url.rsplit("/", 1)[1]
        assert again_id != job_id and page.url == f"{url}/jobs/{again_id}"
        poll(page, "() => document.getElementById('state').textContent === 'succeeded'", timeout=TIMEOUT)
        assert images_loaded(page, ".gallery .card img") == [256, 256]
        assert page.locator("#seed").inner_text().startswith("4242")
        shoot(page, artifacts, "again")
        page.close()
    again = client.get(again_id)
    assert again["state"] == "succeeded" and again["seed"] == 4242 and again["params"] == done["params"]
    assert again["run_id"] is None and again["priority"] == "interactive"
    assert [i["seed"] for i in again["images"]] == [4242, 4243]
    for a, b in zip(done["images"], again["images"]):  # the same pictures
        assert np.array_equal(pixels(s3_object(settings, a["key"])), pixels(s3_object(settings, b["key"])))
    assert sorted(p.name for p in artifacts.glob("*.png")) == ["again.png", "job.png", "live.png", "overview.png", "run.png"]


def test_the_workers_panel_says_which_worker_takes_no_work(settings, chromium, make_key):  # noqa: F811
    """A quarantined worker and one whose spool's disk is full, as their statuses reach the registry
    (the worker registry of this test's queue), on the overview in Chromium and for a key."""
    from models.settings import load_settings
    from models.workers import forget, publish_status

    now = time.time()
    base = {"host": "gpu-7", "pid": 4242, "model": "sd21", "device": "cuda:0", "dtype": "float16",
            "batching": "continuous", "started_at": now - 3600, "updated_at": now, "running": [], "loops": [],
            "images_per_s": 0.0, "draining": False}
    # the reason is the worker's words, markup included: shown as text, never as a tag
    reason = "a module cannot be imported (ModuleNotFoundError: No module named '<img src=x id=injected>')"
    statuses = [
        {**base, "name": "w-sick", "quarantined": {"reason": reason, "since": now - 130, "probes": 2,
                                                   "next_probe": now + 40},
         "spool": {"bytes": 0, "max_bytes": 10**9, "free_bytes": 50 * 10**9, "disk_full": False}},
        {**base, "name": "w-full", "quarantined": None,
         "spool": {"bytes": 35_200_000, "max_bytes": 10**9, "free_bytes": 12_000_000, "disk_full": True}},
        {**base, "name": "w-old"},  # older than quarantine: says neither
    ]
    try:
        for status in statuses:
            assert publish_status(settings, status, ttl=120)
        with serving(load_settings(api_auth="off")) as url:
            page = chromium.new_page(viewport=VIEWPORT)
            assert page.goto(f"{url}/").status == 200
            assert page.locator("#quarantined-count").inner_text() == "1 quarantined"

            def row(name: str) -> Any:
                return page.locator("#workers tr", has=page.locator("code", has_text=name))

            sick = row("w-sick")
            badge = sick.locator(".badge.quarantined")
            assert badge.is_visible() and badge.inner_text() == "quarantined"
            assert sick.locator(".reason").inner_text() == reason
            assert page.locator("#injected").count() == 0 and sick.locator("img").count() == 0
            health = sick.locator("td.health").inner_text()
            assert "for 2 min 1" in health and "probe 3 in 3" in health, health  # 40 s less the page's time
            assert sick.locator(".spool, .spool-bytes").count() == 0  # an empty spool on a roomy disk
            full = row("w-full")
            assert full.locator(".badge.disk-full").is_visible()
            assert full.locator(".spool").inner_text() == "spool disk full free 12.0 MB: no new batch starts"
            assert full.locator(".spool-bytes").inner_text() == "35.2 MB spooled of 1.0 GB, for the object store"
            assert "serving" in full.locator("td.health").inner_text()
            assert full.locator(".badge.quarantined").count() == 0
            assert row("w-old").locator("td.health").inner_text().strip() == "serving"
            ARTIFACTS.mkdir(parents=True, exist_ok=True)  # beside the other test's pages, which it clears
            page.locator("#workers").screenshot(path=str(ARTIFACTS / "workers.png"))
            page.close()
        # with a key: the badge, but not the reason (it may quote a job's error, as ids are a job's)
        with serving(settings) as url, httpx.Client(base_url=url, timeout=30) as http:
            http.post("/login", data={"token": make_key(), "next": "/"})
            overview = http.get("/")
            assert overview.status_code == 200 and "1 quarantined" in overview.text
            assert "ModuleNotFoundError" not in overview.text and "a fault of its host" in overview.text
    finally:
        for status in statuses:
            forget(settings, status["name"])


def workers_shown(page: Any) -> int:
    page.reload()
    return page.locator("#workers td code").count()  # type: ignore[no-any-return]


def has_worker_registry() -> bool:
    try:
        import models.workers  # noqa: F401
    except ImportError:
        return False
    return True


def test_dashboard_keys(settings, make_key):  # noqa: F811
    from producer.cli import main

    bob_name = f"bob-{time.time_ns()}"
    alice, bob = make_key(), make_key(name=bob_name)
    with serving(settings) as url, httpx.Client(base_url=url, timeout=30) as http:
        job_id = http.post("/v1/jobs", json=small(prompt="a quiet harbour", seed=11), headers=bearer(alice)).json()["id"]
        # 1. without a key: every page sends the browser to log in, nothing else answers
        for path in ("/", f"/jobs/{job_id}", "/runs/anything"):
            answer = http.get(path)
            assert answer.status_code == 303 and answer.headers["location"].startswith("/login?next=%2F"), path
            assert "harbour" not in answer.text
        assert http.get(f"/jobs/{job_id}/images/0").status_code == 401
        assert http.get(f"/jobs/{job_id}/events").status_code == 401
        assert http.post(f"/jobs/{job_id}/again").status_code == 303
        login_page = http.get("/login?next=/")
        assert login_page.status_code == 200 and 'name="token"' in login_page.text
        assert "default-src 'none'" in login_page.headers["content-security-policy"]
        refused = http.post("/login", data={"token": "sdq_not-a-key", "next": "/"})
        assert refused.status_code == 401 and "unknown or revoked" in refused.text and "set-cookie" not in refused.headers
        # 2. a key's login: a strict, HttpOnly cookie; the pages show its jobs, no runs (they are no key's)
        answer = http.post("/login", data={"token": alice, "next": f"/jobs/{job_id}"})
        assert answer.status_code == 303 and answer.headers["location"] == f"/jobs/{job_id}"
        cookie = answer.headers["set-cookie"]
        assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower()
        assert "a quiet harbour" in http.get(f"/jobs/{job_id}").text
        overview = http.get("/").text
        assert f"/jobs/{job_id}" in overview and "No run of this key yet" in overview
        assert http.get("/runs/anything").status_code == 404
        assert http.get(f"/v1/jobs/{job_id}").status_code == 401  # the cookie is the dashboard's only
        # 3. submit again: refused from another site's page, else a job of the key's with the same request
        assert http.post(f"/jobs/{job_id}/again", headers={"Origin": "https://evil.example"}).status_code == 403
        answer = http.post(f"/jobs/{job_id}/again", headers={"Origin": url})
        assert answer.status_code == 303
        again_id = answer.headers["location"].rsplit("/", 1)[1]
        again = http.get(f"/v1/jobs/{again_id}", headers=bearer(alice)).json()
        first = http.get(f"/v1/jobs/{job_id}", headers=bearer(alice)).json()
        assert again["seed"] == 11 and again["params"] == first["params"] and again["id"] != job_id
        # 4. another key sees none of it; a login never leads off this site
        answer = http.post("/login", data={"token": bob, "next": "//evil.example/x"})
        assert answer.status_code == 303 and answer.headers["location"] == "/"
        assert http.get(f"/jobs/{job_id}").status_code == 404
        assert "a quiet harbour" not in http.get("/").text
        assert http.get(f"/jobs/{job_id}/events").status_code == 404
        # 5. a revoked key is out at once; logging out forgets the key
        assert main(["keys", "revoke", bob_name]) == 0
        assert http.get("/").status_code == 303
        http.post("/login", data={"token": alice, "next": "/"})
        assert http.get("/").status_code == 200
        assert http.post("/logout", headers={"Origin": url}).status_code == 303
        assert http.get("/").status_code == 303
    for leftover in (job_id, again_id):
        http_cancel(settings, leftover)


def http_cancel(settings: Any, job_id: str) -> None:
    from producer.client import Client

    client = Client(settings)
    try:
        client.cancel(job_id)
    finally:
        client.close()


def test_login_goes_back_only_to_this_site():
    from producer.api.dashboard import safe_next

    assert safe_next("/runs/a%20b?page=2") == "/runs/a%20b?page=2"
    for elsewhere in (None, "", "https://evil.example/", "//evil.example", "/\\evil.example", "/\t/evil.example",
                      "evil.example", "/ /x"):
        assert safe_next(elsewhere) == "/", elsewhere


# -- a big gallery, searched, paged and followed, as keys see it ------------------------------------

GALLERY_JOBS = 50  # one image each: a page of 48 and a second page


def png(shade: int) -> bytes:
    import io

    from PIL import Image as PILImage

    out = io.BytesIO()
    PILImage.new("RGB", (64, 64), (shade, 90, 255 - shade)).save(out, format="PNG")
    return out.getvalue()


@contextmanager
def seeded_runs(settings: Any, client: Any, owner: str, prompts: list[str]) -> Iterator[dict[str, Any]]:
    """A run of `owner`'s (an API key's id) of one-image jobs, succeeded a second apart (the first
    prompt the newest), their images in the object store; and an operator's run (no key's) of
    one job. Written straight into the tables, the rows and objects taken away after."""
    from sqlalchemy import delete

    from models.registry import built_models_dir
    from models.tables import Batch, Image, Job, Run, utcnow

    tag = time.time_ns()
    now = utcnow()
    ids = [str(uuid.uuid4()) for _ in prompts]
    run_ids = [str(uuid.uuid4()), str(uuid.uuid4())]
    names = [f"gallery-{tag}", f"operator-{tag}"]
    batch_id = str(uuid.uuid4())
    keys = [f"dashboard-{tag}/{job_id}/0.png" for job_id in ids]
    for i, key in enumerate(keys):
        client.storage.put(key, png(i * 5 % 256), "image/png")
    params = {**small(prompt=""), "width": 64, "height": 64, "num_inference_steps": 2, "guidance_scale": 7.5,
              "num_images": 1}
    with client.db.session() as session:
        session.add_all([Run(id=run_ids[0], name=names[0], api_key_id=owner, expected_jobs=len(prompts),
                             sealed_at=now, created_at=now - timedelta(minutes=1)),
                         Run(id=run_ids[1], name=names[1], expected_jobs=1, sealed_at=now, created_at=now)])
        session.add(Batch(id=batch_id, worker="gpu-3", model=str(built_models_dir(settings.data_dir) / "tiny"),
                          model_revision="rev-1", scheduler="EulerDiscreteScheduler", device="cuda:0", dtype="float16",
                          size=4, versions={}, jobs=4, seconds=1.0, started_at=now, finished_at=now))
        session.flush()
        for i, (job_id, prompt) in enumerate(zip(ids, prompts)):
            created = now - timedelta(seconds=10 + i)
            session.add(Job(id=job_id, state="succeeded", mode="txt2img",
                            params={**params, "prompt": prompt, "seed": i},
                            seed=i, width=64, height=64, num_inference_steps=2, num_images=1, model="tiny",
                            attempts=1, queue=settings.queue, priority="bulk", run_id=run_ids[0], run_key=f"row-{i}",
                            api_key_id=owner, created_at=created, started_at=created, finished_at=created,
                            updated_at=created))
        session.add(Job(id=str(uuid.uuid4()), state="succeeded", mode="txt2img", params={**params, "prompt": "ops"},
                        seed=1, width=64, height=64, num_inference_steps=2, num_images=1, run_id=run_ids[1],
                        created_at=now, updated_at=now))
        session.flush()
        session.add_all([Image(job_id=job_id, index=0, seed=i, object_key=key, sha256="ab" * 32, size_bytes=100,
                               width=64, height=64, batch_id=batch_id, batch_size=4, batch_position=i % 4,
                               created_at=now - timedelta(seconds=10 + i))
                         for i, (job_id, key) in enumerate(zip(ids, keys))])
    try:
        yield {"names": names, "ids": ids, "created": now - timedelta(minutes=1)}
    finally:
        with client.db.session() as session:
            for table, column, values in ((Image, Image.batch_id, [batch_id]), (Job, Job.run_id, run_ids),
                                          (Batch, Batch.id, [batch_id]), (Run, Run.id, run_ids)):
                session.execute(delete(table).where(column.in_(values)))
        for key in keys:
            client.storage.delete(key)


def key_id(client: Any, token: str) -> str:
    from producer.api.keys import find_key

    key = find_key(client.db, token)
    assert key is not None
    return key.id


def login(page: Any, url: str, token: str) -> None:
    page.goto(f"{url}/login?next=/")
    page.fill("input[name=token]", token)
    with page.expect_navigation():
        page.locator("button", has_text="log in").click()


def forget_keys(client: Any, tokens: list[str]) -> None:
    """The keys and every job they submitted, out of the database."""
    from sqlalchemy import delete

    from models.tables import ApiKey, Job

    ids = [key_id(client, token) for token in tokens]
    with client.db.session() as session:
        session.execute(delete(Job).where(Job.api_key_id.in_(ids)))
        session.execute(delete(ApiKey).where(ApiKey.id.in_(ids)))


def test_gallery_search_and_live_pages_in_chromium(settings, client, chromium, make_key):  # noqa: F811
    """A run of 50 images (rows written straight into the tables) as its key sees it in Chromium:
    a compact gallery a few screens tall whose cards open their record beside it, paged by keyset;
    the registry's name for the model's folder; times in the viewer's zone (UTC, labelled, without
    JavaScript); the jobs searched by prompt and by state, paged; a job submitted and cancelled
    through the API showing on open pages without a reload; and who sees which run."""
    from zoneinfo import ZoneInfo

    prompts = [f"a red fox number {i}" for i in range(GALLERY_JOBS)]
    prompts[3] = "a BLUE whale, 100% <b>bold</b>_x"  # LIKE's wildcards and markup: taken as they are
    prompts[7] = "a blue whale at dawn"
    alice, bob, admin = make_key(), make_key(), make_key("--admin")
    try:
        with seeded_runs(settings, client, key_id(client, alice), prompts) as seeded, serving(settings) as url, \
                httpx.Client(base_url=url, timeout=30) as http:
            mine, operators = seeded["names"]
            # 1. runs and keys: a key sees its own runs, an admin key every run, the operator's too
            for token, sees in ((alice, {mine}), (bob, set()), (admin, {mine, operators})):
                http.post("/login", data={"token": token, "next": "/"})
                overview = http.get("/")
                assert overview.status_code == 200
                for name in (mine, operators):
                    assert http.get(f"/runs/{name}").status_code == (200 if name in sees else 404), (token, name)
                    assert (f'href="/runs/{name}"' in overview.text) == (name in sees), (token, name)
                assert ("No run of this key yet" in overview.text) == (not sees)
            # what a page is asked for is checked: a 422 page, never a query with NUL in it
            for path in ("/?q=a%00b", "/?state=%00", "/?state=done", "/?before=%00", "/?after=bm90LWpzb24",
                         f"/runs/{mine}?before=%00", f"/runs/{mine}?after=WzEsMiwzXQ"):
                answer = http.get(path)
                assert answer.status_code == 422 and "Traceback" not in answer.text, (path, answer.text[:300])
            http.cookies.clear()

            context = chromium.new_context(viewport={"width": 1280, "height": 800}, locale="en-US",
                                           timezone_id="Asia/Kolkata")
            try:
                page = context.new_page()
                login(page, url, alice)
                # 2. the gallery: 48 cards of a thumbnail and the prompt, newest job first, a few screens tall
                assert page.goto(f"{url}/runs/{mine}").status == 200
                cards = page.locator(".gallery details.card")
                assert cards.count() == 48
                height = page.evaluate("() => document.documentElement.scrollHeight")
                assert height < 3000, height
                print(f"a 48-image gallery page at 1280x800: {height} px")
                assert cards.nth(0).locator(".clip").inner_text() == prompts[0]
                # 3. a click opens the card's record beside the gallery, markup shown as text; Escape closes it
                record = cards.nth(3).locator(".record")
                assert not record.is_visible()
                cards.nth(3).locator("summary").click()
                assert record.is_visible()
                text = record.inner_text()
                assert prompts[3] in text and seeded["ids"][3][:8] in text and "position 3 of 4" in text
                model = record.locator("dd.model")
                assert model.inner_text() == "tiny" and model.get_attribute("title").endswith("/models/tiny")
                assert record.locator("button", has_text="submit again").is_visible()
                assert page.evaluate("() => document.documentElement.scrollHeight") == height
                ARTIFACTS.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(ARTIFACTS / "gallery.png"), full_page=True)
                page.keyboard.press("Escape")
                assert not record.is_visible()
                # 4. times in the viewer's zone, named; the run's progress says when it was made
                made = page.locator("#progress time.local")
                local = seeded["created"].astimezone(ZoneInfo("Asia/Kolkata"))
                assert made.inner_text() == f"{local:%b} {local.day}, {local:%Y, %I:%M:%S %p} GMT+5:30"
                # 5. keyset pages of the gallery: the older holds the last two images, the newer the first 48
                page.locator(".pager a.older").click()
                page.wait_for_url("**/runs/*?before=*")
                assert cards.count() == 2 and cards.nth(1).locator(".clip").inner_text() == prompts[-1]
                assert page.locator(".pager a.older").count() == 0
                page.locator(".pager a.newer").click()
                page.wait_for_url("**/runs/*?after=*")
                assert cards.count() == 48 and cards.nth(0).locator(".clip").inner_text() == prompts[0]

                # 6. the jobs, searched: by prompt (any case, wildcards literal), by state, paged
                def found(query: dict[str, str]) -> list[str]:
                    assert page.goto(f"{url}/?{urlencode(query)}").status == 200
                    return page.locator("#recent tr td:nth-child(3)").all_inner_texts()

                assert found({"q": "blue WHALE"}) == [prompts[3], prompts[7]]
                page.screenshot(path=str(ARTIFACTS / "search.png"), full_page=True)
                assert page.locator("#matches").inner_text().startswith("2 matches of prompts holding")
                assert found({"q": "FOX"}) == prompts[:3] + prompts[4:7] + prompts[8:22]
                assert "Showing the newest 20 matches" in page.locator("#matches").inner_text()
                assert found({"q": "100%"}) == found({"q": "</b>_x"}) == [prompts[3]]
                assert found({"q": "d_x"}) == []
                assert found({"q": "<img src=x id=injected>"}) == [] and page.locator("#injected").count() == 0
                assert page.locator("input[name=q]").input_value() == "<img src=x id=injected>"
                assert page.goto(f"{url}/?q={'x' * 201}").status == 422
                assert found({"state": "failed"}) == []
                first = found({"state": "succeeded"})
                assert first == prompts[:20]
                page.locator("#recent a.older").click()
                page.wait_for_url("**/?state=succeeded&before=*")
                assert page.locator("#recent tr td:nth-child(3)").all_inner_texts() == prompts[20:40]
                page.locator("#recent a.older").click()
                page.wait_for_url("**/?state=succeeded&before=*")
                assert page.locator("#recent tr td:nth-child(3)").all_inner_texts() == prompts[40:]
                assert page.locator("#recent a.older").count() == 0
                page.locator("#recent a.newer").click()
                page.wait_for_url("**/?state=succeeded&after=*")
                assert page.locator("#recent tr td:nth-child(3)").all_inner_texts() == prompts[20:40]

                # 7. live: a job submitted, then cancelled, through the API shows on the open overview
                # and on its own open page, neither read again by the browser
                assert page.goto(f"{url}/").status == 200
                page.evaluate("() => { window.stayed = true; }")
                job_id = http.post("/v1/jobs", json=small(prompt="a live otter"), headers=bearer(alice)).json()["id"]
                row = "id => { const a = document.querySelector(`#recent a[href='/jobs/${id}']`);" \
                      " return a && a.closest('tr').querySelector('.state').textContent; }"
                assert poll(page, row, job_id, timeout=TIMEOUT) == "queued"
                job_page = context.new_page()
                assert job_page.goto(f"{url}/jobs/{job_id}").status == 200
                assert job_page.locator("#state").inner_text() == "queued"
                job_page.evaluate("() => { window.stayed = true; }")
                assert http.delete(f"/v1/jobs/{job_id}", headers=bearer(alice)).status_code == 200
                poll(page, f"id => ({row})(id) === 'cancelled'", job_id, timeout=TIMEOUT)
                poll(job_page, "() => document.getElementById('state').textContent === 'cancelled'", timeout=TIMEOUT)
                assert page.evaluate("() => window.stayed") and job_page.evaluate("() => window.stayed")
            finally:
                context.close()

            # 8. without JavaScript: times in UTC, labelled so; a card still opens its record
            context = chromium.new_context(viewport={"width": 1280, "height": 800}, java_script_enabled=False)
            try:
                page = context.new_page()
                login(page, url, alice)
                assert page.goto(f"{url}/runs/{mine}").status == 200
                utc = seeded["created"].astimezone(timezone.utc)
                assert page.locator("#progress time.local").inner_text() == f"{utc:%Y-%m-%d %H:%M:%S} UTC"
                page.locator(".gallery details.card").nth(1).locator("summary").click()
                assert prompts[1] in page.locator(".gallery details.card").nth(1).locator(".record").inner_text()
            finally:
                context.close()
    finally:
        forget_keys(client, [alice, bob, admin])


def test_durations_and_model_names_read_as_people_say_them(tmp_path):
    from types import SimpleNamespace

    from producer.api.dashboard import _duration, _when
    from producer.api.panels import model_name

    assert [_duration(s) for s in (0, 45, 60, 200, 7490, 7200, 3 * 86400 + 4 * 3600 + 59)] == \
        ["0 s", "45 s", "1 min", "3 min 20 s", "2 h 4 min", "2 h", "3 d 4 h"]
    assert str(_when("2026-12-05T10:03:01+01:00")) == \
        '<time datetime="2026-12-05T09:03:01+00:00" class="local">2026-12-05 09:03:01 UTC</time>'
    shared = SimpleNamespace(settings=SimpleNamespace(data_dir=tmp_path))
    hub_cache = "/root/.cache/huggingface/hub/models--stabilityai--stable-diffusion-2-1-base/snapshots/5ede9e4b"
    for recorded, shown in (("sd21", "sd21"), ("stabilityai/stable-diffusion-2-1", "sd21"), (hub_cache, "sd21-base"),
                            (str(tmp_path / "models" / "tiny"), "tiny"), ("/srv/weights/my-finetune/", "my-finetune"),
                            (None, None)):
        assert model_name(recorded, shared) == shown, recorded
