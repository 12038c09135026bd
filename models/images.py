"""Which way up an input image is (its EXIF orientation, the image turned upright), and the
hash of an image's pixels (`pixel_sha256`: the worker, export and `sdqueue reproduce` share it).

A phone stores a portrait photo as the sensor read it (landscape) with an EXIF Orientation tag
that says how to turn it for display. Every place that uses an img2img input turns it upright
first: the worker's decoding (worker/pipeline.py) and the size check at submit
(models.request.check_image). The stored input stays the user's bytes; the turn is a function of
them, so a re-run turns it the same way.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from typing import Any

from PIL import ExifTags, Image

# Orientation tag value -> the transpose that makes the image upright (Pillow's
# ImageOps.exif_transpose uses the same table). 1, or a tag that is missing, unreadable or out of
# range: the image is used as stored.
UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# Orientations that swap width and height.
SIDEWAYS = frozenset({5, 6, 7, 8})


def exif_orientation(img: Image.Image) -> int:
    """The EXIF (or XMP) orientation of an opened image, 1 to 8; 1 where it has none, or one that
    cannot be read: a damaged tag is no reason to refuse an image that decodes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns about corrupt EXIF as well as failing
        try:
            value = img.getexif().get(ExifTags.Base.Orientation, 1)
        except Exception:  # Pillow's EXIF parsing fails on hostile input with many types
            return 1
    return value if isinstance(value, int) and value in UPRIGHT else 1


def upright(img: Image.Image, orientation: int) -> Image.Image:
    """`img` turned by `orientation` (from exif_orientation): upright, as a viewer shows it."""
    method = UPRIGHT.get(orientation)
    return img if method is None else img.transpose(method)


def upright_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) of an opened image once upright."""
    width, height = img.size
    return (height, width) if exif_orientation(img) in SIDEWAYS else (width, height)


# Image modes whose values are read as they are: 16- and 32-bit greyscale, float.
DEPTH_MODES = frozenset({"I;16", "I;16L", "I;16B", "I", "F"})


def depth_values(img: Image.Image) -> Image.Image:
    """A depth map's values, upright, as one float channel (mode "F"): a 16-bit, 32-bit or float
    greyscale image's as they are (a 16-bit PNG keeps its 65,536 levels), any other image's as
    greyscale (RGB weighted as Pillow's "L", alpha ignored)."""
    orientation = exif_orientation(img)
    if img.mode not in DEPTH_MODES:
        img = img.convert("L")
    return upright(img.convert("F"), orientation)


def pixel_sha256(image: bytes | Any) -> str:
    """The sha256 of an image's decoded pixels: RGB, row-major, 8 bits a channel; exactly the bytes
    of `np.asarray(PIL.Image.open(png).convert("RGB"))`. Unlike the file's sha256, it does not
    depend on the PNG's metadata or compression: what a re-made image is compared with.

    `image`: an encoded image file's bytes, or an HxWx3 uint8 array (the worker hashes the array it
    encodes, at no cost of decoding)."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        with Image.open(io.BytesIO(image)) as img:
            return hashlib.sha256(img.convert("RGB").tobytes()).hexdigest()
    shape, dtype = getattr(image, "shape", None), str(getattr(image, "dtype", ""))
    if dtype != "uint8" or shape is None or len(shape) != 3 or shape[2] != 3:
        raise ValueError(f"pixel_sha256 takes image file bytes or an HxWx3 uint8 array, got dtype "
                         f"{dtype or type(image).__name__} and shape {shape}")
    return hashlib.sha256(image.tobytes()).hexdigest()  # C order, whatever the array's strides
