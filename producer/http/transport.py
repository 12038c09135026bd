"""The httpx clients' set-up, the same for both: the API's URL and key (from the environment by
default), the headers, and an https transport made only when a request needs it."""

from __future__ import annotations

import os
import threading
from typing import Any, Callable

import httpx

API_URL_ENV, API_KEY_ENV = "SDQUEUE_API_URL", "SDQUEUE_API_KEY"
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


def settings(base_url: str | None, api_key: str | None) -> tuple[str, str | None]:
    """The URL (checked, without its trailing /) and the key: as given, else SDQUEUE_API_URL and SDQUEUE_API_KEY."""
    url = base_url or os.environ.get(API_URL_ENV, "")
    if not url:
        raise ValueError(f"no API URL: give base_url, or set {API_URL_ENV} (http://HOST:8000)")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"{API_URL_ENV}={url[:80]!r}: must be an http:// or https:// URL")
    return url.rstrip("/"), api_key if api_key is not None else (os.environ.get(API_KEY_ENV) or None)


def headers(api_key: str | None) -> dict[str, str]:
    answer = {"User-Agent": "sdqueue-client"}
    if api_key:
        answer["Authorization"] = f"Bearer {api_key}"
    return answer


class _Lazy(httpx.BaseTransport, httpx.AsyncBaseTransport):
    """A transport made at its first request. An https transport reads the CA bundle when made
    (0.05 s on a quiet machine, 0.2 to 0.4 s on a loaded one): a client of an http:// API needs it
    only if it is sent to https (a presigned URL of the object store), and `sdqueue status` starts
    that much sooner."""

    def __init__(self, make: Callable[[], Any]):
        self._make, self._made = make, None
        self._lock = threading.Lock()

    def _transport(self) -> Any:
        with self._lock:
            if self._made is None:
                self._made = self._make()
        return self._made

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return self._transport().handle_request(request)  # type: ignore[no-any-return]

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self._transport().handle_async_request(request)  # type: ignore[no-any-return]

    def close(self) -> None:
        if self._made is not None:
            self._made.close()

    async def aclose(self) -> None:
        if self._made is not None:
            await self._made.aclose()


def transports(base_url: str, kind: type[Any]) -> dict[str, Any]:
    """httpx.Client's transport options: for an http:// API with no proxy set, the https
    transport made only when needed; else httpx's own (which honours the proxy variables)."""
    if not base_url.startswith("http://") or any(os.environ.get(name) for name in PROXY_VARIABLES):
        return {}
    # Plain http never does TLS: the http:// transport's context is never used, so none is loaded.
    return {"transport": _Lazy(kind), "mounts": {"http://": kind(verify=False)}}
