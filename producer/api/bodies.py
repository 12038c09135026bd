"""Request bodies: read within SDQUEUE_API_MAX_BODY_BYTES, then taken apart as JSON or as a form.

The bound holds twice: a declared Content-Length over it is refused before a byte is read, and
the bytes are counted as they arrive, so a chunked body (no length) stops at the bound too.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from typing import Any, Callable, Iterator

from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from models.errors import InvalidRequest
from models.request import after_from_text
from producer.api.errors import BadBody, BodyTooLarge, answer_for

# Request fields a form carries as text, and what they are made of before validation. A value
# that does not convert stays text, so the refusal names it as given.
INT_FIELDS = frozenset({"num_images", "num_inference_steps", "width", "height", "seed", "noise_level"})
FLOAT_FIELDS = frozenset({"guidance_scale", "strength"})
BOOL_FIELDS = {"true": True, "1": True, "on": True, "yes": True, "false": False, "0": False, "off": False, "no": False}
# Fields whose blank value means what it says; any other field left blank takes its default.
TEXT_FIELDS = frozenset({"prompt", "negative_prompt"})
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
_INTEGER = re.compile(r"[+-]?\d{1,30}")


class BodyLimit:
    """ASGI middleware: 413 for a body over `max_bytes`, declared or counted. The routes in
    `exempt` (method, path) bound their own bodies (an uploaded manifest may be gigabytes)."""

    def __init__(self, app: ASGIApp, max_bytes: int, exempt: frozenset[tuple[str, str]] = frozenset()):
        self.app = app
        self.max_bytes = max_bytes
        self.exempt = exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope["method"], _app_path(scope)) in self.exempt:
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            answer = answer_for(BodyTooLarge(self.max_bytes))
            assert answer is not None
            # The body is not read: the connection cannot be reused after this answer.
            await answer.response()(scope, receive, send)
            return
        # the app's handler answers 413
        await self.app(scope, bounded_receive(receive, self.max_bytes, lambda: BodyTooLarge(self.max_bytes)), send)


def bounded_receive(receive: Receive, bound: int, refusal: Callable[[], Exception]) -> Receive:
    """`receive`, raising `refusal()` once the body has passed `bound` bytes, as it arrives."""
    received = 0

    async def counted() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > bound:
                raise refusal()
        return message

    return counted


def _app_path(scope: Scope) -> str:
    """The request's path within the app (without the prefix a proxy mounts it under)."""
    path, prefix = scope["path"], scope.get("root_path", "")
    return path[len(prefix):] if prefix and path.startswith(prefix) else path


def is_form(request: Request) -> bool:
    return request.headers.get("content-type", "").split(";")[0].strip().lower() in FORM_TYPES


async def read_json(request: Request) -> tuple[Any, bytes]:
    """The body as JSON, and the canonical bytes a retry of the same request has (sorted keys,
    no spaces): BadBody (400) when it is not JSON, InvalidRequest (422) when an object in it gives
    a name twice (which of the two would count is no JSON rule: Python takes the last, others the
    first, so neither is taken)."""
    body = await request.body()
    if not body.strip():
        raise BadBody("the body is empty: send a JSON object of request fields")
    try:
        data = json.loads(body, parse_constant=_no_constant, object_pairs_hook=_Object.of)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise BadBody(f"the body is not JSON: {_reason(exc)}") from None
    repeated = list(_repeated(data))
    if repeated:
        raise InvalidRequest([f"{where} is given more than once" for where in repeated])
    return data, canonical(data)


class _Object(dict):  # type: ignore[type-arg]
    """A JSON object that remembers the names it was given more than once (the last value kept)."""

    repeated: list[str] = []

    @classmethod
    def of(cls, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        made = cls(pairs)
        if len(made) != len(pairs):
            seen: set[str] = set()
            made.repeated = list(dict.fromkeys(name for name, _ in pairs if name in seen or seen.add(name)))
        return made


def _repeated(data: Any, where: str = "") -> Iterator[str]:
    """Where each name given twice is, as a refusal names a field: `seed`, `requests[2].seed`.
    Iterative: a body nested thousands deep (within the parser's bound) must not recurse here."""
    stack = [(data, where)]
    while stack:
        value, where = stack.pop()
        if isinstance(value, dict):
            for name in getattr(value, "repeated", ()):
                yield _member(where, name)
            stack += [(item, _member(where, name)) for name, item in reversed(value.items())]
        elif isinstance(value, list):
            stack += [(item, f"{where}[{index}]") for index, item in reversed(list(enumerate(value)))]


def _member(where: str, name: str) -> str:
    shown = name if name.isidentifier() else repr(name)
    return f"{where}.{shown}" if where else shown


async def read_form(request: Request) -> tuple[dict[str, Any], bytes]:
    """A form's fields as request data (text converted to numbers and booleans where it reads as
    one, a file part's bytes), and their canonical bytes: the multipart boundary, which differs
    from one send to the next, is no part of the request."""
    await request.body()  # within the bound, and kept: the form is parsed from these bytes
    form = await request.form(max_files=4, max_fields=64)
    try:
        fields: dict[str, Any] = {}
        hashed: dict[str, Any] = {}
        problems: list[str] = []
        for name, value in form.multi_items():
            if name in fields:
                problems.append(f"{_member('', name)} is given more than once")
                continue
            if isinstance(value, UploadFile):
                data = await value.read()
                fields[name] = data
                hashed[name] = {"file_sha256": hashlib.sha256(data).hexdigest()}
            elif value.strip() or name in TEXT_FIELDS:
                fields[name] = form_value(name, value)
                hashed[name] = value
            # else: a blank field of an HTML form, left to its default
        if problems:
            raise InvalidRequest(problems)
        return fields, canonical(hashed)
    finally:
        await form.close()


def form_value(name: str, text: str) -> Any:
    """A form field's text as the request field's type, where it reads as one."""
    if name in INT_FIELDS and _INTEGER.fullmatch(text.strip()):
        return int(text)
    if name in FLOAT_FIELDS:
        try:
            number = float(text)
        except ValueError:
            return text
        return number if number == number and abs(number) != float("inf") else text
    if name == "use_compel":
        return BOOL_FIELDS.get(text.strip().lower(), text)
    if name == "after":  # JOB_ID or JOB_ID:INDEX, as the CLI's --after
        after = after_from_text(text)
        return text if after is None else after
    return text


def decode_image(fields: dict[str, Any], where: str = "") -> list[str]:
    """JSON carries the img2img input, the inpainting mask and the depth map as base64 text: decode
    them in place; the problems found (a field that is not base64 is taken out, named in its problem)."""
    problems = []
    for name in ("image", "mask", "depth_map"):
        value = fields.get(name)
        if not isinstance(value, str):
            continue  # bytes from a form, None, or a wrong type parse_request names
        try:
            fields[name] = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            shown = repr(value[:20] + "...") if len(value) > 23 else repr(value)
            problems.append(f"{where}{name}={shown}: not base64 (the {name.replace('_', ' ')} file's bytes, "
                            "base64-encoded)")
            del fields[name]
    return problems


def canonical(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return " ".join(str(exc).split())[:200]
