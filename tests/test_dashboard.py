"""The web dashboard, in headless Chromium (Debian's `chromium`, driven by Playwright; `make browser`
installs it): a run's job made by a real worker shows on the overview, in the run's gallery and on
its own page, each page screenshotted into test-artifacts/dashboard/ (CI keeps that folder); its
"submit again" makes a job of the same parameters and seed, whose page follows it live to its end.
And the dashboard's keys: with auth on, nothing without one, and with one what the API shows it."""

from __future__ import annotations

import json
import shutil
import struct
import time
from pathlib import Path
from typing import Any, Iterator

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
        assert page.locator("#queues td code").first.inner_text() == settings.queue
        run_row = page.locator("#runs tr", has=page.locator(f"a[href='/runs/{name}']"))
        assert run_row.locator(".bar .succeeded").count() == 1 and "1/1" in run_row.inner_text()
        recent = page.locator("#recent tr", has=page.locator(f"a[href='/jobs/{job_id}']"))
        assert prompt in recent.inner_text() and "succeeded" in recent.inner_text()
        if has_worker_registry():  # the worker publishes its status every SDQUEUE_STATUS_INTERVAL
            wait_for(lambda: workers_shown(page), timeout=30, step=0.5)
        shoot(page, artifacts, "overview")

        # 3. the run: its progress and its gallery, each image with its provenance
        page.locator(f"#runs a[href='/runs/{name}']").click()
        page.wait_for_url(f"{url}/runs/{name}")
        assert f"Run {name}" in page.locator("h1").inner_text()
        cards = page.locator(".gallery .card")
        assert cards.count() == 2
        assert images_loaded(page, ".gallery .card img") == [256, 256]  # thumbnails of 256x256 images
        first = cards.nth(0).inner_text()
        assert prompt in first and job_id[:8] in first and "4242" in first and "6.5" in first
        assert "4243" in cards.nth(1).inner_text()  # image 1: seed + 1
        for label in ("model", "revision", "scheduler", "batch", "sha256"):
            assert cards.nth(0).locator("dt", has_text=label).count() >= 1, label
        assert "tiny" in first
        shoot(page, artifacts, "run")

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
        with page.expect_navigation():
            page.locator(".gallery .card").nth(0).locator("button", has_text="submit again").click()
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
            assert "for 2m 1" in health and "probe 3 in 3" in health, health  # 40 s less the page's time
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
        assert f"/jobs/{job_id}" in overview and "Runs belong to no API key" in overview
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
