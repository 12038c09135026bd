"""The generation request: every field, default and bound of the request table.

Everything here is checked before anything is written or enqueued. A request outside a bound
raises InvalidRequest with one line per problem naming the field, the value and the bound.
"""

from __future__ import annotations

import io
import math
import re
import warnings
from typing import Annotated, Any

from PIL import Image, UnidentifiedImageError
from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError, ValidationInfo,
                      field_validator, model_validator)

from models.errors import InvalidRequest
from models.images import depth_values, upright_size
from models.registry import model_modes, request_model
from models.text import check_text

MIN_NUM_IMAGES, MAX_NUM_IMAGES = 1, 4
MIN_STEPS, MAX_STEPS = 1, 512
MIN_GUIDANCE, MAX_GUIDANCE = 1.0, 20.0
MIN_STRENGTH, MAX_STRENGTH = 0.0, 1.0
# The 13 allowed sizes: multiples of 64 from 256 to 1024.
SIZES = tuple(range(256, 1025, 64))
# Image i uses seed + i; the largest seed keeps seed + 3 inside a signed 64-bit column.
MAX_SEED = 2**63 - 1 - (MAX_NUM_IMAGES - 1)
# Bounds of the img2img input file: it is resized to width x height, so larger buys nothing.
MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_IMAGE_SIDE = 4096
MAX_MODEL_CHARS = 512  # the jobs.model column
# A prompt this long is a mistake, not a prompt; without compel only the first 77 tokens count.
MAX_PROMPT_CHARS = 4000
# The x4 upscaler (stable-diffusion-x4-upscaler): its input noised to `noise_level` first (0..350,
# the pipeline's max_noise_level), its output 4x each side of the input, whose sides it takes
# rounded down to multiples of 4 (its VAE's factor, as diffusers' image processor rounds them).
MIN_NOISE_LEVEL, MAX_NOISE_LEVEL, DEFAULT_NOISE_LEVEL = 0, 350, 20
UPSCALE_FACTOR = 4
# Its input at most 256x256 px: 1024x1024 out. A deployment whose SDQUEUE_PIXEL_BUDGET is set
# allows inputs of up to 1/16 of it (the output's pixels are what a worker's budget counts).
MAX_UPSCALE_INPUT_PIXELS = 256 * 256
MIN_UPSCALE_INPUT_SIDE = 16

class After(BaseModel):
    """A follow-up's parent: image `index` of job `job` is its input (queued once that job succeeded)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job: Annotated[str, Field(min_length=1, max_length=36, strict=True)]
    index: Annotated[StrictInt, Field(ge=0, le=MAX_NUM_IMAGES - 1)] = 0


class GenerationRequest(BaseModel):
    """One job: what a producer may ask of the worker."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS, strict=True)]
    negative_prompt: Annotated[str, Field(max_length=MAX_PROMPT_CHARS, strict=True)] = ""
    image: bytes | None = Field(default=None, repr=False)
    # Inpainting: white (128 and above, as greyscale) repaints, black keeps; the image's size.
    mask: bytes | None = Field(default=None, repr=False)
    # Depth-to-image: the caller's depth map (brighter nearer, any size); None: the model's DPT
    # estimates it from the image.
    depth_map: bytes | None = Field(default=None, repr=False)
    num_images: Annotated[StrictInt, Field(ge=MIN_NUM_IMAGES, le=MAX_NUM_IMAGES)] = 1
    num_inference_steps: Annotated[StrictInt, Field(ge=MIN_STEPS, le=MAX_STEPS)] = 25
    guidance_scale: Annotated[float, Field(ge=MIN_GUIDANCE, le=MAX_GUIDANCE)] = 7.5
    strength: Annotated[float, Field(ge=MIN_STRENGTH, le=MAX_STRENGTH)] = 0.8
    width: StrictInt = 768
    height: StrictInt = 768
    seed: Annotated[StrictInt, Field(ge=0, le=MAX_SEED)] | None = None
    use_compel: StrictBool = False
    # The x4 upscaler only: None elsewhere (and then not among the stored parameters).
    noise_level: Annotated[StrictInt, Field(ge=MIN_NOISE_LEVEL, le=MAX_NOISE_LEVEL)] | None = None
    # A follow-up: another job's image is its input instead of `image` (checked against that job
    # where the request is written: models' check_follow_ups in producer/bulk.py).
    after: After | None = None
    # A registry name or an allowed folder (models/registry.py `request_model`); None: the
    # deployment's SDQUEUE_DEFAULT_MODEL, filled in where the request is parsed with its settings.
    model: Annotated[str, Field(min_length=1, max_length=MAX_MODEL_CHARS, strict=True)] | None = Field(
        default=None, validate_default=True)

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty or only spaces")
        return value

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _storable_text(cls, value: str) -> str:
        # PostgreSQL cannot hold NUL; ESC or CR would act on the terminal that shows the prompt.
        return check_text(value)

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str | None, info: ValidationInfo) -> str | None:
        context = info.context or {}
        if value is None:
            default = context.get("default_model")
            if default is None:
                return None
            try:
                return request_model(default, context.get("model_folders", ()))
            except ValueError as exc:
                raise ValueError(f"the default, SDQUEUE_DEFAULT_MODEL={default!r}, {exc}") from None
        return request_model(check_text(value), context.get("model_folders", ()))

    @field_validator("width", "height")
    @classmethod
    def _one_of_sizes(cls, value: int) -> int:
        if value not in SIZES:
            raise ValueError(f"must be a multiple of 64 from {SIZES[0]} to {SIZES[-1]} (one of {', '.join(map(str, SIZES))})")
        return value

    @field_validator("guidance_scale", "strength", mode="before")
    @classmethod
    def _a_number(cls, value: Any) -> Any:
        # JSON has one number type: 7 means 7.0. Text and booleans are not numbers here.
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError("input should be a number")
        if not math.isfinite(value):
            raise ValueError("input should be a finite number")
        return value

    @field_validator("image", "mask")
    @classmethod
    def _real_image(cls, value: bytes | None) -> bytes | None:
        if value is not None:
            check_image(value)
        return value

    @field_validator("depth_map")
    @classmethod
    def _real_depth_map(cls, value: bytes | None) -> bytes | None:
        if value is not None:
            check_depth_map(value)
        return value

    @model_validator(mode="after")
    def _inputs_of_the_mode(self, info: ValidationInfo) -> GenerationRequest:
        """The inputs the model's mode needs, and only those; a mask the size of its image. A
        manifest, which adds the files' bytes after (checked once per file), checks them then."""
        if not (info.context or {}).get("inputs_later"):
            ran = check_inputs(self, pixel_budget=(info.context or {}).get("pixel_budget", 0))
            for name in ("width", "height", "noise_level"):  # an upscaler's: in place, as pydantic wants it
                if getattr(ran, name) != getattr(self, name):
                    object.__setattr__(self, name, getattr(ran, name))
        return self

    @property
    def mode(self) -> str:
        return self.mode_on(self.model)

    def mode_on(self, model: str | None) -> str:
        """The job's mode on `model` (a model key; None: not known yet, and the fields alone say).
        A depth model's job is "depth" whether or not it brings its own depth map."""
        if self.mask is not None:
            return "inpaint"
        if self.noise_level is not None:
            return "upscale"
        if self.depth_map is not None or (model is not None and "depth" in model_modes(model)):
            return "depth"
        return "img2img" if self.has_image else "txt2img"

    @property
    def has_image(self) -> bool:
        """An input image: its bytes, or the image of the job it follows."""
        return self.image is not None or self.after is not None

    def parameters(self) -> dict[str, Any]:
        """Every field but the image, mask and depth map bytes: what is stored with the job and
        embedded in PNGs. A mode's own field (noise_level) and `after` only where set: other jobs'
        parameters stay as before."""
        parameters = self.model_dump(exclude={"image", "mask", "depth_map"})
        for name in ("noise_level", "after"):
            if parameters[name] is None:
                del parameters[name]
        return parameters


def after_from_text(text: str) -> dict[str, Any] | None:
    """JOB_ID[:INDEX] (the CLI's --after, a form's `after`) as the request's `after`, its bounds
    left to the request's own check; None where INDEX is not a whole number."""
    job, _, index = text.strip().partition(":")
    if index and not re.fullmatch(r"[+-]?\d{1,30}", index):
        return None
    return {"job": job, "index": int(index or 0)}


def check_inputs(request: GenerationRequest, sizes: dict[str, tuple[int, int]] | None = None, *,
                 model: str | None = None, pixel_budget: int = 0) -> GenerationRequest:
    """check_mode, and the inputs' sizes (`sizes`: the files' sizes where known already): a mask
    the size of its image; an upscaler's input within its bound. Returns the request as it runs: an
    upscaler's output size (4x its input) and noise level filled in. `model`: the request's own
    when None; `pixel_budget`: the deployment's SDQUEUE_PIXEL_BUDGET (0: automatic)."""
    model = model or request.model
    check_mode(request, model)
    sizes = dict(sizes or {})
    if "image" not in sizes and request.image is not None:
        sizes["image"] = check_image(request.image)
    image = sizes.get("image")  # None: a follow-up's, known once the job it follows is read
    if request.mask is not None and image is not None:
        mask = sizes.get("mask") or check_image(request.mask)
        if image != mask:
            raise ValueError(f"mask: {mask[0]}x{mask[1]} px, and the image is {image[0]}x{image[1]} px: "
                             "they must be the same size")
    if model is not None and "upscale" in model_modes(model) and request.has_image:
        update: dict[str, Any] = {"noise_level": DEFAULT_NOISE_LEVEL if request.noise_level is None else request.noise_level}
        if image is not None:
            update["width"], update["height"] = upscaled_size(image, request, pixel_budget)
        return request.model_copy(update=update)
    return request


def follow_up(request: GenerationRequest, image: tuple[int, int], model: str, pixel_budget: int = 0) -> GenerationRequest:
    """A follow-up as it will run on the image it follows (`image`: its size): check_inputs
    against that image; its width and height, where not given, the image's (an upscaler's output
    follows from the image)."""
    size = {} if "upscale" in model_modes(model) else {
        name: value for name, value in zip(("width", "height"), image) if name not in request.model_fields_set}
    return check_inputs(request.model_copy(update=size), {"image": image}, model=model, pixel_budget=pixel_budget)


def upscaled_size(size: tuple[int, int], request: GenerationRequest, pixel_budget: int = 0) -> tuple[int, int]:
    """The x4 upscaler's output size for an input of `size`: 4x each side, the sides rounded down
    to multiples of 4 first. Refuses an input outside the bound, or a width/height that is not it."""
    bound = max(MAX_UPSCALE_INPUT_PIXELS, pixel_budget // UPSCALE_FACTOR**2)
    width, height = size
    if width * height > bound:
        side = "256x256 px" if bound == MAX_UPSCALE_INPUT_PIXELS else f"SDQUEUE_PIXEL_BUDGET/16 = {bound} px"
        raise ValueError(f"image: {width}x{height} px = {width * height} px is larger than the upscaler's input bound "
                         f"of {bound} px ({side}; the output is 4x each side)")
    if min(width, height) < MIN_UPSCALE_INPUT_SIDE:
        raise ValueError(f"image: {width}x{height} px: the upscaler's input must be at least "
                         f"{MIN_UPSCALE_INPUT_SIDE} px each side")
    out = (width // 4 * 4 * UPSCALE_FACTOR, height // 4 * 4 * UPSCALE_FACTOR)
    for name, value in zip(("width", "height"), out):
        if name in request.model_fields_set and getattr(request, name) != value:
            raise ValueError(f"{name}={getattr(request, name)}: the upscaler's output is 4x its input: {value} px for "
                             f"this {width}x{height} px image (leave width and height out)")
    return out


def check_mode(request: GenerationRequest, model: str | None) -> None:
    """Refuse inputs the model's modes do not take (ValueError naming the field); a model of None
    (not known yet) takes what the request's own fields make sense of."""
    if model is None:
        return
    modes = model_modes(model)
    if request.image is not None and request.after is not None:
        raise ValueError("image and after: a follow-up's input is the image of the job it follows; give one of them")
    if "inpaint" in modes:
        if not request.has_image or request.mask is None:
            missing = " and ".join(name for name, value in (("image", request.has_image), ("mask", request.mask))
                                   if not value)
            raise ValueError(f"{missing} required: model {model} inpaints (an image, and a mask of its size)")
    elif request.mask is not None:
        raise ValueError(f"mask is for inpainting models (sdqueue models list): model {model} runs "
                         f"{', '.join(modes)}")
    if "upscale" in modes:
        if not request.has_image:
            raise ValueError(f"image required: model {model} upscales an image x4 (at most 256x256 px)")
        if "strength" in request.model_fields_set:
            raise ValueError(f"strength is not for upscaler models: model {model} takes noise_level "
                             f"({MIN_NOISE_LEVEL}..{MAX_NOISE_LEVEL}) instead")
    elif request.noise_level is not None:
        raise ValueError(f"noise_level is for upscaler models (sdqueue models list): model {model} runs "
                         f"{', '.join(modes)}")
    if "depth" in modes:
        if not request.has_image:
            raise ValueError(f"image required: model {model} is depth-to-image (an input image, its depth map "
                             "estimated from it or given as depth_map)")
    elif request.depth_map is not None:
        raise ValueError(f"depth_map is for depth models (sdqueue models list): model {model} runs "
                         f"{', '.join(modes)}")


def check_image(data: bytes) -> tuple[int, int]:
    """Refuse anything that is not a readable image within the bounds; return its size."""
    if len(data) > MAX_IMAGE_BYTES:
        raise ValueError(f"file of {len(data)} bytes is larger than the bound of {MAX_IMAGE_BYTES} bytes")
    with warnings.catch_warnings():
        # A malformed file makes Pillow warn (corrupt EXIF, skipped tags) as well as fail: the
        # refusal below is the one line a user sees, and a file that loads despite them is fine.
        warnings.simplefilter("ignore")
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            # Pillow refuses before we see the size: still name our bound.
            bound = f"{MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE} px"
            raise ValueError(f"image is larger than the bound of {bound} ({exc})") from None
        except UnidentifiedImageError:
            raise ValueError("not a readable image file: no image format recognised") from None
        except Exception as exc:  # Pillow's plugins fail on hostile input with many types, not only OSError
            raise ValueError(f"not a readable image file: {_reason(exc)}") from None
        with img:
            width, height = img.size  # read from the header: nothing decoded yet
            if width > MAX_IMAGE_SIDE or height > MAX_IMAGE_SIDE:
                raise ValueError(
                    f"{width}x{height} px is larger than the bound of {MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE} px"
                )
            if width < 1 or height < 1:
                raise ValueError(f"{width}x{height} px is empty")
            try:
                img.load()  # a truncated or corrupt file fails here
            except Exception as exc:  # e.g. NotImplementedError (DDS), AttributeError (SPIDER), TypeError (TIFF)
                raise ValueError(f"not a readable image file: {_reason(exc)}") from None
            width, height = upright_size(img)  # as shown: a phone's portrait is stored sideways
    return width, height


def check_depth_map(data: bytes) -> tuple[int, int]:
    """check_image, and a map of at least two depths: diffusers stretches its lowest to highest
    value over -1..1, and a map of one value would divide by zero. Returns its size."""
    size = check_image(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # as check_image: a file that loads despite Pillow's warnings is fine
        with Image.open(io.BytesIO(data)) as img:
            low, high = depth_values(img).getextrema()
    if low == high:
        raise ValueError(f"every pixel is {low:g}: a depth map needs at least two depths (its darkest is taken as "
                         "the farthest, its brightest as the nearest)")
    return size


def _reason(exc: Exception) -> str:
    """Pillow's message on one line, or the exception's name where it has none."""
    return " ".join(str(exc).split()) or type(exc).__name__


def _key(key: Any) -> str:
    """A key as given where it is a plain name, else its repr (cut short): a refusal stays one line."""
    if isinstance(key, str) and key.isidentifier() and len(key) <= 60:
        return key
    return repr(key[:57] + "...") if isinstance(key, str) and len(key) > 60 else repr(key)


def _describe(error: dict[str, Any]) -> str:
    if not error["loc"] and error["type"] == "value_error":  # a check across fields: its message names them
        return str(error.get("ctx", {}).get("error") or error["msg"])
    field = ".".join(str(part) for part in error["loc"]) or "request"
    if error["type"] == "missing":
        return f"{field} is required"
    if error["type"] == "extra_forbidden":
        return f"{_key(error['loc'][-1])} is not a request field"
    if error["type"] == "invalid_key":  # a key that is not text, from a Python caller
        return f"{_key(error['input'])} is not a request field"
    value = error.get("input")
    shown = f"<{len(value)} bytes>" if isinstance(value, bytes) else repr(value)
    if isinstance(value, str) and len(value) > 60:
        shown = repr(value[:57] + "...")
    message = str(error.get("ctx", {}).get("error") or error["msg"])
    message = message[0].lower() + message[1:]
    return f"{field}={shown}: {message}"


def model_context(settings: Any) -> dict[str, Any]:
    """What parse_request needs of a deployment's settings to check and fill in `model`."""
    return {"default_model": settings.default_model, "model_folders": tuple(settings.model_folder_list),
            "pixel_budget": settings.pixel_budget}


def parse_request(data: dict[str, Any], settings: Any = None, *, inputs_later: bool = False) -> GenerationRequest:
    """Build a request from plain data, raising InvalidRequest naming every bad field. With the
    deployment's `settings`, its model is checked against them and filled in when none is named;
    without, only a registry name passes, and None stays None. `inputs_later`: the image, mask and
    depth map are added after, and check_inputs called then."""
    if not isinstance(data, dict):
        raise InvalidRequest([f"request must be an object of fields, not {type(data).__name__}"])
    context = {} if settings is None else model_context(settings)
    if inputs_later:
        context["inputs_later"] = True
    try:
        # Not GenerationRequest(**data): a key that is not text is a bad field, not a TypeError.
        return GenerationRequest.model_validate(data, context=context or None)
    except ValidationError as exc:
        raise InvalidRequest([_describe(e) for e in exc.errors()]) from None
