"""Property-based fuzzing of the whole OpenAPI schema against the running API (schemathesis): for
valid and invalid data alike, no server error, and every answer is one the schema describes."""

from __future__ import annotations

import ipaddress
import json
import re
import socket
import uuid
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance, response_schema_conformance, status_code_conformance,
)

from tests.test_api import api, bearer, make_key  # noqa: F401  (api, make_key: fixtures)


def _schema() -> Any:
    """The app's OpenAPI document, made without serving it: cases are collected before any fixture
    runs (schemathesis' lazy `from_fixture` fails under pytest 9: it sets `node._nodeid`), and each
    case goes to the server its test starts."""
    from models.settings import Settings
    from producer.api import create_app

    return schemathesis.openapi.from_dict(create_app(Settings()).openapi())


schema = _schema()

# POST /v1/runs takes a manifest's bytes in these types: rows good and bad, a grid or not, any bytes
_value = st.one_of(st.text(max_size=20), st.integers(), st.none())
_rows = st.lists(st.dictionaries(st.sampled_from(["prompt", "seed", "width", "key", "image"]), _value), max_size=3)
_lines = _rows.map(lambda rows: "".join(json.dumps(row) + "\n" for row in rows).encode())
schemathesis.openapi.media_type("application/x-ndjson", _lines, aliases=["application/jsonl"])
schemathesis.openapi.media_type("application/toml", st.one_of(
    st.sampled_from([b'prompts = ["a cat"]\nseeds = [1, 2]\nsizes = ["256x256"]\n', b"prompts = ", b""]),
    st.binary(max_size=40)))
schemathesis.openapi.media_type("application/vnd.apache.parquet", st.binary(max_size=64))


@pytest.fixture(autouse=True)
def instant_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    """A submit resolves its webhook URL's host; each made-up name of the fuzzer would wait out this
    machine's DNS (5 s, offline). Here a name resolves at once to one public address; addresses
    (the server's 127.0.0.1) resolve as ever."""
    real = socket.getaddrinfo

    def resolve(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if host != "localhost":
                return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("93.184.215.14", port or 80))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)


@pytest.fixture
def token(make_key: Any) -> str:  # noqa: F811
    return make_key()  # no limits: the fuzzer is never refused 429


@schema.parametrize()
@hypothesis_settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_error_and_answers_match_the_schema(case: Any, api: str, token: str) -> None:  # noqa: F811
    # A valid Idempotency-Key made fresh for each case: the fuzzer's few short keys, each reused with
    # many bodies, would make most submits a 409 and leave the bodies unread.
    key = (case.headers or {}).get("Idempotency-Key")
    if isinstance(key, str) and re.fullmatch(r"[!-~]{1,255}", key):
        case.headers["Idempotency-Key"] = uuid.uuid4().hex
    case.call_and_validate(base_url=api, headers=bearer(token), timeout=30,
                           checks=[not_a_server_error, status_code_conformance, content_type_conformance,
                                   response_schema_conformance])
