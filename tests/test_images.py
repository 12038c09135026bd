"""models/images.py: the EXIF orientation of an input image and the image turned upright."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image, ImageOps

from models.images import exif_orientation, upright, upright_size

ORIENTATION = 0x0112


def tagged(orientation: object | None, fmt: str = "JPEG", size: tuple[int, int] = (48, 32)) -> bytes:
    """An image with no symmetry (each pixel its own colour), carrying `orientation` as its EXIF tag."""
    width, height = size
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[..., 0] = np.arange(width)[None, :] * 5
    pixels[..., 1] = np.arange(height)[:, None] * 7
    exif = Image.Exif()
    if orientation is not None:
        exif[ORIENTATION] = orientation
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_upright_turns_as_pillow_does(orientation, fmt):
    with Image.open(io.BytesIO(tagged(orientation, fmt))) as img:
        assert exif_orientation(img) == orientation
        ours = upright(img.convert("RGB"), exif_orientation(img))
        size = upright_size(img)
    with Image.open(io.BytesIO(tagged(orientation, fmt))) as img:
        pillows = ImageOps.exif_transpose(img).convert("RGB")
    assert np.array_equal(np.asarray(ours), np.asarray(pillows))
    assert ours.size == size == ((32, 48) if orientation >= 5 else (48, 32))


@pytest.mark.parametrize("orientation", [None, 0, 9, 65535])
def test_an_image_without_a_usable_orientation_is_used_as_stored(orientation):
    with Image.open(io.BytesIO(tagged(orientation))) as img:
        assert exif_orientation(img) == 1
        assert upright(img, 1) is img and upright_size(img) == (48, 32)


class Tags:
    """An opened image as far as exif_orientation looks: what getexif gives, or raises."""

    size = (48, 32)

    def __init__(self, tags: object):
        self.tags = tags

    def getexif(self) -> object:
        if isinstance(self.tags, Exception):
            raise self.tags
        return self.tags


@pytest.mark.parametrize("tags", [{ORIENTATION: "6"}, {ORIENTATION: (6, 6)}, {ORIENTATION: [6]}, {ORIENTATION: 6.0},
                                  {ORIENTATION: True}, SyntaxError("not a TIFF file"), struct.error("unpack")])
def test_an_orientation_that_is_not_a_number_from_1_to_8_reads_as_1(tags):
    assert exif_orientation(Tags(tags)) == 1  # type: ignore[arg-type]
    assert upright_size(Tags(tags)) == (48, 32)  # type: ignore[arg-type]


def test_damaged_exif_reads_as_no_orientation():
    data = bytearray(tagged(6))
    at = data.index(b"Exif\x00\x00") + 6
    data[at:at + 8] = b"\xff" * 8  # the TIFF header of the EXIF block: neither byte order
    with Image.open(io.BytesIO(bytes(data))) as img:
        assert exif_orientation(img) == 1 and upright_size(img) == (48, 32)


def test_images_loads_no_torch():
    from tests.test_layout import loaded_after

    assert loaded_after("import models.images") == []
