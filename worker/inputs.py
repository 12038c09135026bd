"""A job's input image as the models take it (no torch: the worker's claim path prepares it)."""

from __future__ import annotations

import io
from typing import Any

from PIL import Image

from models.images import exif_orientation, upright
from models.request import UPSCALE_FACTOR


# The EXIF orientation prepare_input_image applied, kept in the prepared image's info (the image
# travels with its samples to the engine, which puts it in each image's record).
ORIENTATION_INFO = "sdqueue_input_orientation"


def prepare_input_image(data: bytes, width: int, height: int) -> Image.Image:
    """The img2img input as the pipeline takes it: upright by its EXIF orientation (a phone's
    portrait is stored sideways), RGB, resized to width x height."""
    with Image.open(io.BytesIO(data)) as img:
        orientation = exif_orientation(img)
        img = upright(img.convert("RGB"), orientation)
        if img.size != (width, height):
            img = img.resize((width, height), Image.Resampling.LANCZOS)
        img.info[ORIENTATION_INFO] = orientation
        return img


def input_size(params: dict[str, Any]) -> tuple[int, int]:
    """The size a job's input is taken at: its output's (width x height), but for the x4 upscaler
    (a job with a noise level) a quarter of it each side, the input's own size rounded down to 4s."""
    width, height = params["width"], params["height"]
    if params.get("noise_level") is not None:
        return width // UPSCALE_FACTOR, height // UPSCALE_FACTOR
    return width, height


def prepare_mask(data: bytes, width: int, height: int) -> Image.Image:
    """An inpainting mask as the pipeline takes it: upright as its image is, greyscale (alpha
    ignored), resized to width x height; diffusers' mask processor then repaints 128 and above."""
    with Image.open(io.BytesIO(data)) as img:
        img = upright(img.convert("L"), exif_orientation(img))
        if img.size != (width, height):
            img = img.resize((width, height), Image.Resampling.LANCZOS)
        return img


def input_orientation(image: Image.Image | None) -> int | None:
    """The EXIF orientation applied to a prepared input (1: used as stored); None: no input."""
    return None if image is None else image.info.get(ORIENTATION_INFO)
