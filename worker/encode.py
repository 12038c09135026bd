"""PNG encoding with the image's complete record embedded as text chunks.

Three kinds of chunk: `sdqueue`, the whole record as JSON (what `sdqueue reproduce` and the README's
diffusers snippet read); a few fields of it on their own, for image viewers; and `parameters`, the
settings as AUTOMATIC1111's WebUI writes them, which its "PNG Info" tab, civitai and other tools read.
"""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

# The text chunk holding the whole record as JSON; the others are for image viewers.
RECORD_CHUNK = "sdqueue"
# The chunk AUTOMATIC1111's WebUI writes its infotext into (modules/images.py) and reads back.
A1111_CHUNK = "parameters"

# AUTOMATIC1111's sampler names for diffusers' schedulers (the table in diffusers' scheduler
# overview; PNDM skipping its Runge-Kutta steps is PLMS). A scheduler without one goes by its class name.
A1111_SAMPLERS = {
    "EulerDiscreteScheduler": "Euler",
    "EulerAncestralDiscreteScheduler": "Euler a",
    "DPMSolverMultistepScheduler": "DPM++ 2M",
    "DPMSolverSDEScheduler": "DPM++ SDE",
    "KDPM2DiscreteScheduler": "DPM2",
    "KDPM2AncestralDiscreteScheduler": "DPM2 a",
    "HeunDiscreteScheduler": "Heun",
    "LMSDiscreteScheduler": "LMS",
    "DDIMScheduler": "DDIM",
    "PNDMScheduler": "PLMS",
    "UniPCMultistepScheduler": "UniPC",
}


def encode_png(image: Image.Image, record: dict[str, Any]) -> bytes:
    info = PngInfo()
    info.add_text(RECORD_CHUNK, json.dumps(record, sort_keys=True))
    for key in ("prompt", "negative_prompt"):
        info.add_itxt(key, str(record.get(key, "")))
    for key in ("seed", "model", "model_revision", "scheduler"):
        info.add_text(key, str(record.get(key, "")))
    info.add_text(A1111_CHUNK, a1111_parameters(record))  # iTXt when it is not Latin-1, as the WebUI's
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def a1111_sampler(scheduler: str, config: dict[str, Any]) -> tuple[str, str | None]:
    """(Sampler, Schedule type) as AUTOMATIC1111 names them; the schedule type only when not the
    sampler's own (Karras sigmas)."""
    sampler = A1111_SAMPLERS.get(scheduler, scheduler)
    if scheduler == "DPMSolverMultistepScheduler" and config.get("algorithm_type") == "sde-dpmsolver++":
        sampler = "DPM++ 2M SDE"
    return sampler, "Karras" if config.get("use_karras_sigmas") else None


def a1111_parameters(record: dict[str, Any]) -> str:
    """The record as AUTOMATIC1111's infotext (modules/processing.py `create_infotext`): the prompt,
    a `Negative prompt:` line when there is one, then one line of `Key: value` pairs joined by ", ",
    a value holding a comma, colon or newline JSON-quoted (infotext_utils.quote):

        a red fox
        Negative prompt: blurry
        Steps: 25, Sampler: Euler, CFG scale: 7.5, Seed: 7, Size: 768x768, Model: sd21
    """
    sampler, schedule = a1111_sampler(str(record.get("scheduler", "")), record.get("scheduler_config") or {})
    params: dict[str, Any] = {
        "Steps": record.get("num_inference_steps"),
        "Sampler": sampler or None,
        "Schedule type": schedule,
        "CFG scale": record.get("guidance_scale"),
        "Seed": record.get("seed"),
        "Size": f"{record['width']}x{record['height']}" if "width" in record and "height" in record else None,
        "Model": record.get("model"),
        "Denoising strength": record.get("strength") if record.get("mode") == "img2img" else None,
    }
    line = ", ".join(f"{key}: {_quote(value)}" for key, value in params.items() if value is not None)
    text = str(record.get("prompt", ""))
    if record.get("negative_prompt"):
        text += f"\nNegative prompt: {record['negative_prompt']}"
    return f"{text}\n{line}".strip()  # stripped, as the WebUI's


def _quote(value: Any) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",\n:") else text


def read_record(png: bytes) -> dict[str, Any]:
    """The record a PNG made by sdqueue carries."""
    with Image.open(io.BytesIO(png)) as img:
        return json.loads(img.text[RECORD_CHUNK])  # type: ignore[attr-defined]


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
