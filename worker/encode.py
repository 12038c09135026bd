"""PNG encoding with the image's complete record embedded as text chunks."""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

# The text chunk holding the whole record as JSON; the others are for image viewers.
RECORD_CHUNK = "sdqueue"


def encode_png(image: Image.Image, record: dict[str, Any]) -> bytes:
    info = PngInfo()
    info.add_text(RECORD_CHUNK, json.dumps(record, sort_keys=True))
    for key in ("prompt", "negative_prompt"):
        info.add_itxt(key, str(record.get(key, "")))
    for key in ("seed", "model", "model_revision", "scheduler"):
        info.add_text(key, str(record.get(key, "")))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def read_record(png: bytes) -> dict[str, Any]:
    """The record a PNG made by sdqueue carries."""
    with Image.open(io.BytesIO(png)) as img:
        return json.loads(img.text[RECORD_CHUNK])  # type: ignore[attr-defined]


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
