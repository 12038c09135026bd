"""A job's input image as the models take it (no torch: the worker's claim path prepares it)."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

from models.images import depth_values, exif_orientation, upright
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


def prepare_depth_map(data: bytes) -> Image.Image:
    """A caller's depth map as the depth pipeline takes it: upright, one float channel
    (models.images.depth_values: brighter nearer), its own lowest..highest value scaled to 0..1.
    Diffusers stretches the map to -1..1 again at latent size, so the scaling changes nothing but
    the rounding; done first, a 16-bit map's 65,535 fits in fp16 (whose largest value is 65,504).
    Its size is kept: diffusers resizes it to the latent size itself (bicubic)."""
    with Image.open(io.BytesIO(data)) as img:
        values = np.asarray(depth_values(img), dtype=np.float32)
    low, high = float(values.min()), float(values.max())
    if low == high:  # refused at submit (models.request.check_depth_map): a map changed since
        raise ValueError(f"every pixel of the depth map is {low:g}: it needs at least two depths")
    return Image.fromarray((values - low) / (high - low))


def input_orientation(image: Image.Image | None) -> int | None:
    """The EXIF orientation applied to a prepared input (1: used as stored); None: no input."""
    return None if image is None else image.info.get(ORIENTATION_INFO)
