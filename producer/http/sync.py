"""`Client`: the API's routes as blocking methods."""

from __future__ import annotations

import io
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx

from producer.http import transport
from producer.http.errors import ApiError, NotFound, Unauthorized, WaitTimeout, error_for, unreachable
from producer.http.records import Job, Run, RunCreated, parsed
from producer.http.wire import (POLL_SECONDS, STREAM_READ_SECONDS, Call, Event, JobEvents, Retries, batch_call,
                                create_run_call, download_timeout, export_call, fallback, jobs_params, segment,
                                stream_timeout, submit_call)


class Client:
    """The API's routes as methods (blocking). `base_url` and `api_key` default to SDQUEUE_API_URL
    and SDQUEUE_API_KEY; `timeout` is each request's (connect, read, write) in seconds; `retries`
    and `backoff`: see the package's docstring."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *, timeout: float = 30.0,
                 retries: int = 4, backoff: float = 0.5):
        self.base_url, self.api_key = transport.settings(base_url, api_key)
        self.retries, self.backoff = retries, backoff
        self.timeout = httpx.Timeout(timeout)
        self._http = httpx.Client(base_url=self.base_url, headers=transport.headers(self.api_key), timeout=self.timeout,
                                  **transport.transports(self.base_url, httpx.HTTPTransport))

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # the wire: one call, retried where it is safe; an error answer raised as its ApiError

    def _send(self, call: Call, *, stream: bool = False, retries: int | None = None, timeout: Any = None,
              follow_redirects: bool = False) -> httpx.Response:
        tries = Retries(call, self.retries if retries is None else retries, self.backoff)
        while True:
            try:
                response = self._http.send(call.request(self._http, timeout), stream=stream,
                                           follow_redirects=follow_redirects)
            except httpx.TransportError as exc:
                if (delay := tries.after_failure(exc)) is None:
                    raise unreachable(self.base_url, exc) from exc
                time.sleep(delay)
                continue
            if not response.is_error:
                return response
            if stream:
                response.read()
                response.close()
            error = error_for(response)
            if (delay := tries.after_refusal(response, error)) is None:
                raise error
            time.sleep(delay)

    def _json(self, call: Call) -> Any:
        response = self._send(call)
        try:
            return response.json()
        except ValueError:
            raise ApiError(f"the API answered {response.status_code} with no JSON", status_code=response.status_code) \
                from None

    # jobs

    def submit(self, request: dict[str, Any], *, image: bytes | str | os.PathLike[str] | None = None,
               priority: str | None = None, webhook_url: str | None = None, webhook_events: list[str] | None = None,
               idempotency_key: str | None = None, prefer_wait: int | None = None,
               mask: bytes | str | os.PathLike[str] | None = None,
               depth_map: bytes | str | os.PathLike[str] | None = None) -> Job:
        """Submit one job: `request` holds the request's fields (prompt, num_images, seed, ...);
        `image` (a path or bytes) makes it img2img and goes as a multipart file part, as do an
        inpainting model's `mask` and a depth model's `depth_map`. Answers the
        record as queued; with `prefer_wait=N`, as it is when it ends or after N seconds.
        Retried safely: every try carries the same Idempotency-Key (`idempotency_key`, or one made
        for this call)."""
        call = submit_call(request, image=image, priority=priority, webhook_url=webhook_url,
                           webhook_events=webhook_events, idempotency_key=idempotency_key, prefer_wait=prefer_wait,
                           mask=mask, depth_map=depth_map)
        return parsed(Job.from_json, self._json(call))

    def submit_many(self, requests: list[dict[str, Any]], *, priority: str | None = None,
                    webhook_url: str | None = None, webhook_events: list[str] | None = None,
                    idempotency_key: str | None = None) -> list[Job]:
        """1 to 1000 requests, all or nothing (Invalid names each bad one as `requests[i].field`)."""
        call = batch_call(requests, priority=priority, webhook_url=webhook_url, webhook_events=webhook_events,
                          idempotency_key=idempotency_key)
        return [parsed(Job.from_json, job) for job in self._json(call)["jobs"]]

    def get(self, job_id: str) -> Job:
        """The job's record: state, attempts, times, seed, its images (NotFound for another key's)."""
        return parsed(Job.from_json, self._json(Call("GET", f"/v1/jobs/{segment(job_id)}", replayable=True)))

    def jobs(self, *, state: str | None = None, run: str | None = None, since: datetime | str | None = None,
             page_size: int = 50) -> Iterator[Job]:
        """The key's jobs, newest first, read a page at a time as the iterator goes."""
        return self._pages("/v1/jobs", lambda cursor: jobs_params(state, run, since, page_size, cursor), "jobs",
                           Job.from_json)

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued or running job; Conflict (with `.state`) once it has ended."""
        return parsed(Job.from_json, self._json(Call("DELETE", f"/v1/jobs/{segment(job_id)}")))

    def wait(self, job_id: str, *, timeout: float | None = None, on_event: Callable[[Event], None] | None = None,
             poll: float = POLL_SECONDS) -> Job:
        """Block until the job ends; its final record (WaitTimeout after `timeout` seconds).

        It follows the job's Server-Sent Events. When the API refuses the stream (all of the key's
        stream places taken: 429) or it breaks, it reads the record every `poll` seconds instead.
        `on_event` gets {"type": "state", "state", "job"}, {"type": "progress", "step", "steps"},
        and {"type": "polling", "reason"} when it falls back. Once events stop (a job queued with
        no worker), the deadline is kept to within the stream's 15 s keep-alive."""
        deadline = None if timeout is None else time.monotonic() + timeout
        job = self._follow(job_id, deadline, timeout or 0.0, on_event)
        if job is not None:
            return job
        seen = None
        while True:
            job = self.get(job_id)
            if on_event is not None and job.state != seen:
                on_event({"type": "state", "state": job.state, "job": job})
                seen = job.state
            if job.ended:
                return job
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise WaitTimeout(job, timeout or 0.0)
            time.sleep(poll if left is None else min(poll, left))

    def _follow(self, job_id: str, deadline: float | None, timeout: float,
                on_event: Callable[[Event], None] | None) -> Job | None:
        """The job's end from its event stream; None when the stream is refused or breaks."""
        left = None if deadline is None else deadline - time.monotonic()
        try:
            response = self._send(Call("GET", f"/v1/jobs/{segment(job_id)}/events"), stream=True, retries=0,
                                  timeout=stream_timeout(self.timeout, left))
        except (NotFound, Unauthorized):
            raise
        except ApiError as exc:
            return fallback(on_event, exc)
        try:
            events = JobEvents(on_event)
            for line in response.iter_lines():
                if (name := events.feed(line)) is None:
                    continue
                if name == "end":
                    return events.job
                if deadline is not None and time.monotonic() >= deadline:
                    return self._timed_out(job_id, timeout)
            return fallback(on_event, "the event stream ended before the job did")
        except httpx.ReadTimeout:
            if deadline is not None and time.monotonic() >= deadline - 0.05:
                return self._timed_out(job_id, timeout)
            return fallback(on_event, f"the event stream was silent for {STREAM_READ_SECONDS:g} s")
        except (httpx.TransportError, ValueError) as exc:  # a dropped stream, a frame that is not JSON
            return fallback(on_event, f"the event stream broke ({type(exc).__name__})")
        finally:
            response.close()

    def _timed_out(self, job_id: str, timeout: float) -> Job:
        job = self.get(job_id)  # the record is the answer: it may have ended just now
        if job.ended:
            return job
        raise WaitTimeout(job, timeout)

    def fetch(self, job_id: str, dest: str | os.PathLike[str], *, force: bool = False) -> list[Path]:
        """Download the job's images into the folder `dest` as JOBID-INDEX.png; the paths.

        The CLI's rules (producer/outputs.py): BadDestination before anything is downloaded when
        `dest` cannot be made or written, or an image's file is there (unless `force`); each file
        is whole or absent, checked against its recorded sha256; when anything fails, the files
        and folders this call made are removed."""
        from producer.http import downloads
        from producer.outputs import Outputs

        folder, out = Path(dest), Outputs(force=force)
        with out.all_or_nothing("the images this fetch wrote"):
            out.folder(folder)
            job = self.get(job_id)
            targets = downloads.image_targets(job, folder, force)
            for image, path in zip(job.images, targets):
                response = self._send(Call("GET", f"/v1/jobs/{segment(job.id)}/images/{image.index}",
                                           replayable=True), follow_redirects=True)
                out.write_bytes(path, downloads.checked(image, response.content))
        return targets

    # runs

    def create_run(self, manifest: bytes | str | os.PathLike[str], *, name: str, format: str | None = None,
                   skip_invalid: bool = False, append: bool = False, priority: str | None = None,
                   defaults: dict[str, Any] | None = None) -> RunCreated:
        """Upload a manifest (JSONL, CSV, Parquet) or a grid (TOML) as the run `name`; again with the
        same file and options it enqueues only what is missing. Invalid (with `.body["rejects"]`)
        when rows are bad, unless `skip_invalid`."""
        call = create_run_call(manifest, name=name, format=format, skip_invalid=skip_invalid, append=append,
                               priority=priority, defaults=defaults)
        return parsed(RunCreated.from_json, self._json(call))

    def runs(self, *, page_size: int = 50) -> Iterator[Run]:
        """The runs the key sees, newest first, a page at a time."""
        return self._pages("/v1/runs", lambda cursor: {"limit": page_size, "cursor": cursor}, "runs", Run.from_json)

    def _pages(self, path: str, params: Callable[[str | None], dict[str, Any]], key: str,
               kind: Callable[[Any], Any]) -> Iterator[Any]:
        """The items of a keyset-paged list (`key` in each page), a page read at a time as the iterator goes."""
        cursor = None
        while True:
            page = self._json(Call("GET", path, params=params(cursor), replayable=True))
            yield from (parsed(kind, item) for item in page[key])
            cursor = page.get("next_cursor")
            if not cursor:
                return

    def run(self, name: str) -> Run:
        """A run's counts by state, images done, rate and ETA."""
        return parsed(Run.from_json, self._json(Call("GET", f"/v1/runs/{segment(name)}", replayable=True)))

    def cancel_run(self, name: str, state: str = "queued") -> tuple[Run, int]:
        """Cancel a run's queued jobs (or `state` running, or all); the run and how many were cancelled."""
        answer = self._json(Call("POST", f"/v1/runs/{segment(name)}:cancel", params={"state": state}))
        return parsed(Run.from_json, answer["run"]), int(answer["cancelled"])

    def retry_run(self, name: str) -> tuple[Run, int]:
        """Queue a run's failed jobs again, with the same seeds; the run and how many."""
        answer = self._json(Call("POST", f"/v1/runs/{segment(name)}:retry"))
        return parsed(Run.from_json, answer["run"]), int(answer["retried"])

    def export_run(self, name: str, dest: str | os.PathLike[str] | None = None, *, format: str,
                   split: str | None = None, to: str | None = None, force: bool = False) -> list[Path] | dict[str, Any]:
        """A run as a dataset (imagefolder, webdataset, parquet, hf). Into the folder `dest`: the
        API's tar stream unpacked as it arrives (each file whole, none outside `dest`, a folder that
        is not empty refused unless `force`; everything removed if it fails), the paths written.
        With `to="s3"`: made in the API's object store, the answer (presigned URLs) as given."""
        from producer.http import downloads

        call = export_call(name, format=format, split=split, to=to)
        if to is not None:
            return self._json(call)  # type: ignore[no-any-return]
        if dest is None:
            raise ValueError("export_run: give dest (a folder), or to='s3'")
        folder = Path(dest)
        downloads.export_folder(folder, force)
        response = self._send(call, stream=True, timeout=download_timeout(self.timeout))
        try:
            return downloads.extract(io.BufferedReader(downloads.Chunks(response.iter_bytes())), folder, force)
        except httpx.TransportError as exc:
            raise unreachable(self.base_url, exc) from exc
        finally:
            response.close()
