"""`AsyncClient`: Client's methods for asyncio, on the same requests, records, errors and retries."""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import httpx

from producer.http import transport
from producer.http.errors import ApiError, NotFound, Unauthorized, WaitTimeout, error_for, unreachable
from producer.http.records import Job, Run, RunCreated, parsed
from producer.http.wire import (POLL_SECONDS, STREAM_READ_SECONDS, Call, Event, JobEvents, Retries, batch_call,
                                create_run_call, download_timeout, export_call, fallback, jobs_params, segment,
                                stream_timeout, submit_call)


class AsyncClient:
    """Client's methods for asyncio (`await api.submit(...)`, `async for job in api.jobs()`); the
    same arguments, answers, errors and retries."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *, timeout: float = 30.0,
                 retries: int = 4, backoff: float = 0.5):
        self.base_url, self.api_key = transport.settings(base_url, api_key)
        self.retries, self.backoff = retries, backoff
        self.timeout = httpx.Timeout(timeout)
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=transport.headers(self.api_key),
                                       timeout=self.timeout,
                                       **transport.transports(self.base_url, httpx.AsyncHTTPTransport))

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, call: Call, *, stream: bool = False, retries: int | None = None, timeout: Any = None,
                    follow_redirects: bool = False) -> httpx.Response:
        import anyio

        tries = Retries(call, self.retries if retries is None else retries, self.backoff)
        while True:
            try:
                response = await self._http.send(call.request(self._http, timeout), stream=stream,
                                                 follow_redirects=follow_redirects)
            except httpx.TransportError as exc:
                if (delay := tries.after_failure(exc)) is None:
                    raise unreachable(self.base_url, exc) from exc
                await anyio.sleep(delay)
                continue
            if not response.is_error:
                return response
            if stream:
                await response.aread()
                await response.aclose()
            error = error_for(response)
            if (delay := tries.after_refusal(response, error)) is None:
                raise error
            await anyio.sleep(delay)

    async def _json(self, call: Call) -> Any:
        response = await self._send(call)
        try:
            return response.json()
        except ValueError:
            raise ApiError(f"the API answered {response.status_code} with no JSON", status_code=response.status_code) \
                from None

    async def submit(self, request: dict[str, Any], *, image: bytes | str | os.PathLike[str] | None = None,
                     priority: str | None = None, webhook_url: str | None = None,
                     webhook_events: list[str] | None = None, idempotency_key: str | None = None,
                     prefer_wait: int | None = None, mask: bytes | str | os.PathLike[str] | None = None,
                     depth_map: bytes | str | os.PathLike[str] | None = None) -> Job:
        call = submit_call(request, image=image, priority=priority, webhook_url=webhook_url,
                           webhook_events=webhook_events, idempotency_key=idempotency_key, prefer_wait=prefer_wait,
                           mask=mask, depth_map=depth_map)
        return parsed(Job.from_json, await self._json(call))

    async def submit_many(self, requests: list[dict[str, Any]], *, priority: str | None = None,
                          webhook_url: str | None = None, webhook_events: list[str] | None = None,
                          idempotency_key: str | None = None) -> list[Job]:
        call = batch_call(requests, priority=priority, webhook_url=webhook_url, webhook_events=webhook_events,
                          idempotency_key=idempotency_key)
        return [parsed(Job.from_json, job) for job in (await self._json(call))["jobs"]]

    async def get(self, job_id: str) -> Job:
        return parsed(Job.from_json, await self._json(Call("GET", f"/v1/jobs/{segment(job_id)}", replayable=True)))

    def jobs(self, *, state: str | None = None, run: str | None = None, since: datetime | str | None = None,
             page_size: int = 50) -> AsyncIterator[Job]:
        return self._pages("/v1/jobs", lambda cursor: jobs_params(state, run, since, page_size, cursor), "jobs",
                           Job.from_json)

    async def cancel(self, job_id: str) -> Job:
        return parsed(Job.from_json, await self._json(Call("DELETE", f"/v1/jobs/{segment(job_id)}")))

    async def wait(self, job_id: str, *, timeout: float | None = None,
                   on_event: Callable[[Event], None] | None = None, poll: float = POLL_SECONDS) -> Job:
        """As Client.wait; the deadline is kept exactly (the stream is read under a cancel scope)."""
        import anyio

        with anyio.move_on_after(timeout) as scope:
            job = await self._follow(job_id, on_event)
            if job is not None:
                return job
            seen = None
            while True:
                job = await self.get(job_id)
                if on_event is not None and job.state != seen:
                    on_event({"type": "state", "state": job.state, "job": job})
                    seen = job.state
                if job.ended:
                    return job
                await anyio.sleep(poll)
        assert scope.cancelled_caught
        job = await self.get(job_id)
        if job.ended:
            return job
        raise WaitTimeout(job, timeout or 0.0)

    async def _follow(self, job_id: str, on_event: Callable[[Event], None] | None) -> Job | None:
        import anyio

        try:
            response = await self._send(Call("GET", f"/v1/jobs/{segment(job_id)}/events"), stream=True, retries=0,
                                        timeout=stream_timeout(self.timeout, None))
        except (NotFound, Unauthorized):
            raise
        except ApiError as exc:
            return fallback(on_event, exc)
        try:
            events = JobEvents(on_event)
            async for line in response.aiter_lines():
                if events.feed(line) == "end":
                    return events.job
            return fallback(on_event, "the event stream ended before the job did")
        except httpx.ReadTimeout:
            return fallback(on_event, f"the event stream was silent for {STREAM_READ_SECONDS:g} s")
        except (httpx.TransportError, ValueError) as exc:
            return fallback(on_event, f"the event stream broke ({type(exc).__name__})")
        finally:
            with anyio.CancelScope(shield=True):  # closed even when the wait's deadline cancels the read
                await response.aclose()

    async def fetch(self, job_id: str, dest: str | os.PathLike[str], *, force: bool = False) -> list[Path]:
        from producer.http import downloads
        from producer.outputs import Outputs

        folder, out = Path(dest), Outputs(force=force)
        with out.all_or_nothing("the images this fetch wrote"):
            out.folder(folder)
            job = await self.get(job_id)
            targets = downloads.image_targets(job, folder, force)
            for image, path in zip(job.images, targets):
                response = await self._send(Call("GET", f"/v1/jobs/{segment(job.id)}/images/{image.index}",
                                                 replayable=True), follow_redirects=True)
                out.write_bytes(path, downloads.checked(image, response.content))
        return targets

    async def create_run(self, manifest: bytes | str | os.PathLike[str], *, name: str, format: str | None = None,
                         skip_invalid: bool = False, append: bool = False, priority: str | None = None,
                         defaults: dict[str, Any] | None = None) -> RunCreated:
        call = create_run_call(manifest, name=name, format=format, skip_invalid=skip_invalid, append=append,
                               priority=priority, defaults=defaults)
        return parsed(RunCreated.from_json, await self._json(call))

    def runs(self, *, page_size: int = 50) -> AsyncIterator[Run]:
        return self._pages("/v1/runs", lambda cursor: {"limit": page_size, "cursor": cursor}, "runs", Run.from_json)

    async def _pages(self, path: str, params: Callable[[str | None], dict[str, Any]], key: str,
                     kind: Callable[[Any], Any]) -> AsyncIterator[Any]:
        """The items of a keyset-paged list (`key` in each page), a page read at a time as the iterator goes."""
        cursor = None
        while True:
            page = await self._json(Call("GET", path, params=params(cursor), replayable=True))
            for item in page[key]:
                yield parsed(kind, item)
            cursor = page.get("next_cursor")
            if not cursor:
                return

    async def run(self, name: str) -> Run:
        return parsed(Run.from_json, await self._json(Call("GET", f"/v1/runs/{segment(name)}", replayable=True)))

    async def cancel_run(self, name: str, state: str = "queued") -> tuple[Run, int]:
        answer = await self._json(Call("POST", f"/v1/runs/{segment(name)}:cancel", params={"state": state}))
        return parsed(Run.from_json, answer["run"]), int(answer["cancelled"])

    async def retry_run(self, name: str) -> tuple[Run, int]:
        answer = await self._json(Call("POST", f"/v1/runs/{segment(name)}:retry"))
        return parsed(Run.from_json, answer["run"]), int(answer["retried"])

    async def export_run(self, name: str, dest: str | os.PathLike[str] | None = None, *, format: str,
                         split: str | None = None, to: str | None = None,
                         force: bool = False) -> list[Path] | dict[str, Any]:
        """As Client.export_run; the stream is spooled to a temporary file, then unpacked."""
        import tempfile

        from producer.http import downloads

        call = export_call(name, format=format, split=split, to=to)
        if to is not None:
            return await self._json(call)  # type: ignore[no-any-return]
        if dest is None:
            raise ValueError("export_run: give dest (a folder), or to='s3'")
        folder = Path(dest)
        downloads.export_folder(folder, force)
        response = await self._send(call, stream=True, timeout=download_timeout(self.timeout))
        with tempfile.TemporaryFile() as spool:
            try:
                async for chunk in response.aiter_bytes():
                    spool.write(chunk)
            except httpx.TransportError as exc:
                raise unreachable(self.base_url, exc) from exc
            finally:
                await response.aclose()
            spool.seek(0)
            return downloads.extract(spool, folder, force)  # type: ignore[arg-type]
