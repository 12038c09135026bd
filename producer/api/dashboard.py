"""The web dashboard at `/`: server-rendered pages (Jinja2, templates/) for people, beside the API.

    /                         queues and their depths, jobs by state, workers, runs with progress bars, the
                              jobs (?q= prompt text, ?state=, paged by ?before=/?after= cursors)
    /runs/{name}              a run's progress and its gallery: thumbnails, each image's record on a click
    /jobs/{id}                a job: parameters, images, provenance, live progress (the events stream)
    /jobs/{id}/images/{i}     an image (?thumbnail=1: a small JPEG), served through the API
    POST /jobs/{id}/again     a new job with the same parameters and seed; answers with its page
    /login, POST /logout      the key of a browser

A browser cannot send `Authorization: Bearer`: with SDQUEUE_API_AUTH=on the dashboard takes a key's
token at /login and keeps it in an HttpOnly, SameSite=Strict cookie, checked at every request as
the header is (a revoked key is out at once), and shows what the API shows that key. Without a
live key a page sends the browser to /login and shows nothing. The cookie is the dashboard's only:
the /v1 routes read the header alone. POSTs must come from a page of the same origin. With
SDQUEUE_API_AUTH=off the dashboard shows every job and run, to anyone who can reach it.

Images are served through the API, not by redirect to the object store, whose endpoint a browser
may not reach; pages allow scripts only of their own (a nonce), images and forms only from here.

The pages work without JavaScript (times then show in UTC, labelled so). With it, times show in
the viewer's zone, and a page reads itself again every few seconds while its tab is visible, as
`?fragment=1` (its content alone), swapping the sections marked `data-live` that changed; the job
page follows its job's event stream instead while the job runs.
"""

from __future__ import annotations

import secrets
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from markupsafe import Markup
from starlette.concurrency import run_in_threadpool

from producer.api import panels
from producer.api.app import Backend, backend, root
from producer.api.auth import Caller, caller_of_token
from producer.api.errors import Unauthorized, answer_for
from producer.api.events import follow

router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(directory=Path(__file__).with_name("templates"))

COOKIE = "sdqueue_key"
# The most a login form may carry (a token is 47 characters).
MAX_LOGIN_BYTES = 4096


def _utc(value: Any) -> datetime | None:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if not isinstance(value, datetime):
        return None
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def _when(value: Any) -> Markup | str:
    """A time as `<time>`: UTC, labelled, for a page without JavaScript; the page's script shows
    it in the viewer's zone with the zone's name."""
    when = _utc(value)
    if when is None:
        return "-"
    return Markup('<time datetime="{}" class="local">{} UTC</time>').format(
        when.isoformat(timespec="seconds"), when.strftime("%Y-%m-%d %H:%M:%S"))


def _ago(value: Any) -> Markup | str:
    """How long ago, as people say it ("3 min ago"), the time itself on hover."""
    when = _utc(value)
    if when is None:
        return "-"
    seconds = (datetime.now(timezone.utc) - when).total_seconds()
    said = "just now" if seconds < 5 else f"{_duration(seconds)} ago"
    return Markup('<time datetime="{}" class="ago" title="{} UTC">{}</time>').format(
        when.isoformat(timespec="seconds"), when.strftime("%Y-%m-%d %H:%M:%S"), said)


def _duration(seconds: float) -> str:
    """A duration as people read it, to its two largest units: "45 s", "3 min 20 s", "2 h 5 min", "3 d 4 h"."""
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h" if hours else f"{days} d"
    if hours:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    if minutes:
        return f"{minutes} min {secs} s" if secs else f"{minutes} min"
    return f"{secs} s"


templates.env.filters["when"] = _when
templates.env.filters["ago"] = _ago
templates.env.filters["duration"] = _duration


# -- who is looking ----------------------------------------------------------------------------------

async def viewer(request: Request, shared: Backend) -> Caller | None:
    """The caller behind a browser: anyone with auth off, else the key of its cookie; None: nobody."""
    if shared.settings.api_auth == "off":
        return Caller(key_id=None)
    token = request.cookies.get(COOKIE)
    if not token:
        return None
    try:
        return await caller_of_token(shared, token)
    except Unauthorized:
        return None


def to_login(request: Request) -> RedirectResponse:
    """To the login page, which comes back here after."""
    prefix, here = root(request), request.url.path
    if prefix and here.startswith(prefix):
        here = here[len(prefix):]
    if request.url.query:
        here += "?" + request.url.query
    return RedirectResponse(f"{prefix}/login?next={quote(here or '/', safe='')}", status_code=303)


def same_origin(request: Request) -> bool:
    """A POST sent by a page of this site (browsers send Origin with every POST); one without
    Origin is no browser's cross-site form, so it is let through."""
    origin = request.headers.get("origin")
    return origin is None or urlsplit(origin).netloc == request.headers.get("host")


def safe_next(target: str | None) -> str:
    """Where to go after login: a path of this site only, never another host."""
    if (not target or not target.startswith("/") or target.startswith("//") or "\\" in target
            or not target.isprintable() or any(ch.isspace() for ch in target)):
        return "/"
    return target


# -- pages ---------------------------------------------------------------------------------------------

def page(request: Request, name: str, who: Caller | None, status_code: int = 200, **context: Any) -> HTMLResponse:
    """A page; with ?fragment=1 its content alone (what the page's script reads again to update itself)."""
    nonce = secrets.token_urlsafe(16)
    shared: Backend = request.app.state.backend
    fragment = request.query_params.get("fragment") == "1"
    response = templates.TemplateResponse(
        request, name, {"root": root(request), "who": who, "auth": shared.settings.api_auth == "on", "nonce": nonce,
                        "fragment": fragment, **context}, status_code=status_code)
    response.headers["Content-Security-Policy"] = (
        f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'unsafe-inline'; img-src 'self'; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
    response.headers["Referrer-Policy"] = "same-origin"
    response.headers["Cache-Control"] = "no-store"
    return response


def refused(request: Request, who: Caller | None, exc: Exception) -> HTMLResponse:
    """A known error (404, 422, 429, 503, ...) as a page; anything else goes on to the app's handlers."""
    answer = answer_for(exc)
    if answer is None:
        raise exc
    detail = answer.body.get("detail")
    lines = detail if isinstance(detail, list) else [str(detail)]
    response = page(request, "error.html", who, answer.status_code, status=answer.status_code, lines=lines)
    if "Retry-After" in answer.headers:
        response.headers["Retry-After"] = answer.headers["Retry-After"]
    return response


@router.get("/", response_class=HTMLResponse)
async def overview(request: Request, q: str | None = None, state: str | None = None, before: str | None = None,
                   after: str | None = None, shared: Backend = Depends(backend)) -> Response:
    who = await viewer(request, shared)
    if who is None:
        return to_login(request)
    try:
        search = panels.read_search(q, state, before, after)
        found = await run_in_threadpool(panels.overview, shared, who, search)
    except Exception as exc:
        return refused(request, who, exc)
    return page(request, "overview.html", who, **found)


@router.get("/runs/{name:path}", response_class=HTMLResponse)
async def run_page(name: str, request: Request, before: str | None = None,
                   after: str | None = None, shared: Backend = Depends(backend)) -> Response:
    who = await viewer(request, shared)
    if who is None:
        return to_login(request)
    try:
        found = await run_in_threadpool(panels.run_page, shared, who, name, before, None if before else after)
    except Exception as exc:
        return refused(request, who, exc)
    return page(request, "run.html", who, **found)


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
async def job_page(job_id: str, request: Request, shared: Backend = Depends(backend)) -> Response:
    who = await viewer(request, shared)
    if who is None:
        return to_login(request)
    try:
        job = await run_in_threadpool(panels.job_page, shared, who, job_id)
    except Exception as exc:
        return refused(request, who, exc)
    return page(request, "job.html", who, job=job)


@router.post("/jobs/{job_id}/again")
async def submit_again(job_id: str, request: Request, shared: Backend = Depends(backend)) -> Response:
    who = await viewer(request, shared)
    if who is None:
        return to_login(request)
    if not same_origin(request):
        return page(request, "error.html", who, 403, status=403, lines=["a form of another site cannot submit here"])
    try:
        new_id = await run_in_threadpool(panels.submit_again, shared, who, job_id)
    except Exception as exc:
        return refused(request, who, exc)
    return RedirectResponse(f"{root(request)}/jobs/{new_id}", status_code=303)


# -- what the pages load --------------------------------------------------------------------------------

@router.get("/jobs/{job_id}/images/{index}")
async def image(job_id: str, index: int, request: Request, thumbnail: bool = False,
                shared: Backend = Depends(backend)) -> Response:
    who = await viewer(request, shared)
    if who is None:
        return Response("log in at /login", status_code=401, media_type="text/plain")
    data, media_type = await run_in_threadpool(panels.image_bytes, shared, who, job_id, index, thumbnail)
    # An image's object never changes (a new claim writes under a new key): the browser keeps it.
    return Response(data, media_type=media_type, headers={"Cache-Control": "private, max-age=86400"})


@router.get("/jobs/{job_id}/events")
async def events(job_id: str, request: Request, shared: Backend = Depends(backend)) -> Response:
    """The API's event stream of the job, for the page's EventSource (which cannot send a header)."""
    who = await viewer(request, shared)
    if who is None:
        return Response("log in at /login", status_code=401, media_type="text/plain")
    return await follow(job_id, request, who=who, shared=shared)


# -- login ----------------------------------------------------------------------------------------------

@router.get("/login", response_class=HTMLResponse)
async def login_form(request: Request, target: str | None = Query(None, alias="next", max_length=2000),
                     shared: Backend = Depends(backend)) -> Response:
    if shared.settings.api_auth == "off":
        return RedirectResponse(f"{root(request)}{safe_next(target)}", status_code=303)
    return page(request, "login.html", await viewer(request, shared), next=safe_next(target), error=None)


@router.post("/login", response_class=HTMLResponse)
async def login(request: Request, shared: Backend = Depends(backend)) -> Response:
    if not same_origin(request):
        return page(request, "error.html", None, 403, status=403, lines=["a form of another site cannot log in here"])
    form = await request.form(max_files=0, max_fields=4, max_part_size=MAX_LOGIN_BYTES)
    token, target = str(form.get("token") or "").strip(), safe_next(str(form.get("next") or "/"))
    if shared.settings.api_auth == "off":
        return RedirectResponse(f"{root(request)}{target}", status_code=303)
    try:
        await caller_of_token(shared, token)
    except Unauthorized:
        return page(request, "login.html", None, 401, next=target, error="unknown or revoked API key")
    except Exception as exc:
        return refused(request, None, exc)
    response = RedirectResponse(f"{root(request)}{target}", status_code=303)
    response.set_cookie(COOKIE, token, path=f"{root(request)}/", httponly=True, samesite="strict",
                        secure=request.url.scheme == "https")
    return response


@router.post("/logout")
async def logout(request: Request) -> Response:
    if not same_origin(request):
        return Response("a form of another site cannot log out here", status_code=403, media_type="text/plain")
    response = RedirectResponse(f"{root(request)}/login", status_code=303)
    response.delete_cookie(COOKIE, path=f"{root(request)}/", httponly=True, samesite="strict")
    return response
