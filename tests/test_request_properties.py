"""Properties of the request schema, for any input: a request either parses within every bound
or is refused with InvalidRequest naming the field and the value; nothing else ever escapes.
The same for an image's bytes and `check_image`, which may only return a size or raise ValueError."""

from __future__ import annotations

import io
import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from PIL import Image

from models.errors import InvalidRequest
from models.request import (
    MAX_GUIDANCE, MAX_IMAGE_SIDE, MAX_NUM_IMAGES, MAX_PROMPT_CHARS, MAX_SEED, MAX_STEPS, MAX_STRENGTH, MIN_GUIDANCE,
    MIN_NUM_IMAGES, MIN_STEPS, MIN_STRENGTH, SIZES, GenerationRequest, check_image, parse_request,
)

# Same examples on every run (CI stays reproducible), no example database written into the
# checkout, and no deadline: the first image decode of a run is slow.
PROPERTIES = hypothesis_settings(derandomize=True, database=None, deadline=None, max_examples=300,
                                 suppress_health_check=[HealthCheck.too_slow])

FIELDS = set(GenerationRequest.model_fields)
INT_BOUNDS = {"num_images": (MIN_NUM_IMAGES, MAX_NUM_IMAGES), "num_inference_steps": (MIN_STEPS, MAX_STEPS),
              "seed": (0, MAX_SEED)}
FLOAT_BOUNDS = {"guidance_scale": (MIN_GUIDANCE, MAX_GUIDANCE), "strength": (MIN_STRENGTH, MAX_STRENGTH)}


def _image(fmt: str = "PNG", size: tuple[int, int] = (16, 16), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, (90, 30, 200) if mode == "RGB" else 0).save(buf, format=fmt)
    return buf.getvalue()


IMAGES = [_image("PNG"), _image("JPEG"), _image("GIF", mode="P"), _image("BMP"), _image("TIFF"), _image("WEBP"),
          _image("DDS", mode="RGBA"), _image("SPIDER", mode="F"), _image("ICO", mode="RGBA"), _image("PPM")]


def shown(value: Any) -> str:
    """How a refusal shows a bad value: its repr, long text cut short, bytes by their length."""
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    if isinstance(value, str) and len(value) > 60:
        return repr(value[:57] + "...")
    return repr(value)


def shown_key(key: Any) -> str:
    """How a refusal shows a key that is not a field: as given where it is a plain name."""
    return key if isinstance(key, str) and key.isidentifier() and len(key) <= 60 else shown(key)


# --- strategies -----------------------------------------------------------------------------

# Text as a hostile client may send it: every code point, lone surrogates and NUL included.
any_text = st.text(st.characters(exclude_categories=()), max_size=20)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | any_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(any_text, inner, max_size=3),
    max_leaves=6,
)


def _near(low: int, high: int) -> st.SearchStrategy[int]:
    return st.integers(low - 3, low + 3) | st.integers(high - 3, high + 3) | st.integers()


# Each field: mostly values near its bounds (where a schema goes wrong), sometimes anything at all.
plausible: dict[str, st.SearchStrategy[Any]] = {
    "prompt": st.text(max_size=30) | st.text(min_size=MAX_PROMPT_CHARS - 2, max_size=MAX_PROMPT_CHARS + 2),
    "negative_prompt": st.text(max_size=30) | st.just("x" * (MAX_PROMPT_CHARS + 1)),
    "image": st.none() | st.binary(max_size=64) | st.sampled_from(IMAGES),
    "num_images": _near(MIN_NUM_IMAGES, MAX_NUM_IMAGES),
    "num_inference_steps": _near(MIN_STEPS, MAX_STEPS),
    "guidance_scale": st.floats(MIN_GUIDANCE - 1, MAX_GUIDANCE + 1) | st.floats() | st.integers(-2, 25),
    "strength": st.floats(MIN_STRENGTH - 1, MAX_STRENGTH + 1) | st.floats() | st.integers(-2, 3),
    "width": st.sampled_from(SIZES) | st.integers(0, 1100),
    "height": st.sampled_from(SIZES) | st.integers(0, 1100),
    "seed": st.none() | _near(0, MAX_SEED),
    "use_compel": st.booleans() | st.integers(0, 1),
}
extra_keys = st.dictionaries(
    st.text(min_size=1, max_size=8).filter(lambda key: key not in FIELDS) | st.integers(-5, 5), json_values, max_size=2
)


@st.composite
def any_request(draw: st.DrawFn) -> dict[Any, Any]:
    data: dict[Any, Any] = {}
    for field, values in plausible.items():
        if draw(st.integers(0, 9)) < (9 if field == "prompt" else 4):  # the prompt is usually there
            data[field] = draw(values | json_values) if draw(st.integers(0, 4)) == 0 else draw(values)
    if draw(st.integers(0, 5)) == 0:
        data.update(draw(extra_keys))
    return data


# What a text field may hold: anything but control characters (tab and newline aside) and lone
# surrogates, which a database or a terminal cannot hold.
REFUSED_CHARACTERS = "".join(map(chr, [*range(0x09), *range(0x0B, 0x20), *range(0x7F, 0xA0)]))
storable = st.characters(exclude_categories=("Cs",), exclude_characters=REFUSED_CHARACTERS)

valid_request = st.fixed_dictionaries(
    {"prompt": st.text(storable, min_size=1, max_size=200).filter(str.strip)},
    optional={
        "negative_prompt": st.text(storable, max_size=200) | st.just("n" * MAX_PROMPT_CHARS),
        "image": st.none() | st.sampled_from(IMAGES[:6]),
        "num_images": st.integers(MIN_NUM_IMAGES, MAX_NUM_IMAGES),
        "num_inference_steps": st.integers(MIN_STEPS, MAX_STEPS),
        "guidance_scale": st.floats(MIN_GUIDANCE, MAX_GUIDANCE) | st.integers(1, 20),
        "strength": st.floats(MIN_STRENGTH, MAX_STRENGTH) | st.sampled_from([0, 1]),
        "width": st.sampled_from(SIZES),
        "height": st.sampled_from(SIZES),
        "seed": st.none() | st.integers(0, MAX_SEED),
        "use_compel": st.booleans(),
    },
)


# --- (a) anything: parsed within bounds, or refused naming what was wrong ----------------------


def assert_within_bounds(request: GenerationRequest) -> None:
    assert isinstance(request.prompt, str) and request.prompt.strip() and len(request.prompt) <= MAX_PROMPT_CHARS
    assert isinstance(request.negative_prompt, str) and len(request.negative_prompt) <= MAX_PROMPT_CHARS
    for field, (low, high) in INT_BOUNDS.items():
        value = getattr(request, field)
        assert (field == "seed" and value is None) or (type(value) is int and low <= value <= high), (field, value)
    for field, (low, high) in FLOAT_BOUNDS.items():
        value = getattr(request, field)
        assert isinstance(value, float) and math.isfinite(value) and low <= value <= high, (field, value)
    assert request.width in SIZES and request.height in SIZES
    assert type(request.width) is int and type(request.height) is int
    assert type(request.use_compel) is bool
    if request.image is not None:
        width, height = check_image(request.image)
        assert 1 <= width <= MAX_IMAGE_SIDE and 1 <= height <= MAX_IMAGE_SIDE


@PROPERTIES
@given(any_request())
@example({1: "not text", "prompt": "a cat"})  # a key that is not text once escaped as TypeError
@example({"prompt": "a\udcffcat"})  # a lone surrogate: not UTF-8, so not a prompt
@example({"prompt": "a cat", "\nX-Injected": 1})  # a key with a newline once made a refusal two lines
def test_anything_parses_within_bounds_or_is_refused_naming_the_field(data):
    try:
        request = parse_request(data)
    except InvalidRequest as exc:
        assert exc.problems and "\n" not in str(exc)
        for problem in exc.problems:
            assert (
                problem == "prompt is required" and "prompt" not in data
                or any(problem == f"{shown_key(key)} is not a request field" for key in data if key not in FIELDS)
                or any(problem.startswith(f"{key}={shown(data[key])}: ") for key in data)
            ), (problem, data)
        return
    assert set(data) <= FIELDS
    assert_within_bounds(request)
    for field, value in data.items():
        assert getattr(request, field) == value, field


# --- (b) every valid request parses, and its parameters come back as the same request ----------


@PROPERTIES
@given(valid_request)
def test_valid_requests_parse_and_round_trip_through_parameters(data):
    request = parse_request(data)
    assert_within_bounds(request)
    assert request.mode == ("img2img" if data.get("image") is not None else "txt2img")
    params = request.parameters()
    assert set(params) == FIELDS - {"image", "mask", "depth_map", "noise_level", "after"}  # a mode's own field only where set
    # What the job row stores (JSON) and the worker reads back is the same request, less the image.
    stored = json.loads(json.dumps(params))
    assert parse_request(stored) == request.model_copy(update={"image": None})
    assert parse_request({**stored, "image": request.image}) == request


# --- (c) each single violation is refused, naming the field and the value ---------------------


def _violations() -> st.SearchStrategy[tuple[str, Any]]:
    def of(field: str, values: st.SearchStrategy[Any]) -> st.SearchStrategy[tuple[str, Any]]:
        return st.tuples(st.just(field), values)

    not_a_number = st.booleans() | any_text | st.lists(st.integers(), max_size=2) | st.none()
    cases = []
    for field, (low, high) in INT_BOUNDS.items():
        cases += [of(field, st.integers(max_value=low - 1)), of(field, st.integers(min_value=high + 1)),
                  of(field, st.booleans()), of(field, st.floats()), of(field, any_text)]
        if field != "seed":
            cases.append(of(field, st.none()))
    for field, (low, high) in FLOAT_BOUNDS.items():
        cases += [of(field, st.floats(max_value=low, exclude_max=True)),
                  of(field, st.floats(min_value=high, exclude_min=True)),
                  of(field, st.sampled_from([math.nan, math.inf, -math.inf])), of(field, not_a_number),
                  of(field, st.integers(max_value=math.floor(low) - 1) | st.integers(min_value=math.ceil(high) + 1))]
    for field in ("width", "height"):
        cases += [of(field, st.integers().filter(lambda v: v not in SIZES)),
                  of(field, st.sampled_from(SIZES).map(float)),
                  of(field, st.booleans()), of(field, st.sampled_from(SIZES).map(str)), of(field, st.none())]
    whitespace = st.text(st.sampled_from(" \t\n\r\x0b\x0c\u00a0\u2028\u3000"), max_size=5)
    cases += [
        of("prompt", whitespace), of("prompt", st.text(min_size=MAX_PROMPT_CHARS + 1, max_size=MAX_PROMPT_CHARS + 50)),
        of("prompt", st.integers() | st.none() | st.binary(max_size=4) | st.lists(any_text, max_size=2)),
        of("negative_prompt", st.text(min_size=MAX_PROMPT_CHARS + 1, max_size=MAX_PROMPT_CHARS + 50)),
        of("negative_prompt", st.integers() | st.none() | st.lists(any_text, max_size=2)),
        *(of(field, st.tuples(st.text(storable, max_size=20), st.sampled_from(REFUSED_CHARACTERS),
                              st.text(storable, max_size=20)).map(lambda parts: "a" + "".join(parts)))
          for field in ("prompt", "negative_prompt")),
        of("use_compel", st.integers(0, 1) | st.sampled_from(["true", "yes", "1"]) | st.none() | st.floats()),
        of("image", st.binary(max_size=64)), of("image", st.integers() | st.lists(st.integers(), max_size=2)),
    ]
    return st.one_of(cases)


@PROPERTIES
@given(_violations())
def test_every_single_violation_is_refused_naming_the_field_and_the_value(violation):
    field, value = violation
    with pytest.raises(InvalidRequest) as caught:
        parse_request({"prompt": "a cat", field: value})
    assert len(caught.value.problems) == 1, caught.value.problems
    assert caught.value.problems[0].startswith(f"{field}={shown(value)}: "), caught.value.problems


# --- check_image: a size within bounds, or ValueError -----------------------------------------


@st.composite
def mangled_images(draw: st.DrawFn) -> bytes:
    """A real image of some format with a few bytes changed and maybe cut short: what a fuzzer
    sends, and where Pillow's decoders fail in surprising ways."""
    data = bytearray(draw(st.sampled_from(IMAGES)))
    for _ in range(draw(st.integers(1, 6))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(1, len(data)))]) if draw(st.booleans()) else bytes(data)


def _changed(data: bytes, at: int, new: bytes) -> bytes:
    return data[:at] + new + data[at + len(new):]


# Found by fuzzing: each escaped check_image as another exception type and the CLI printed a traceback.
HOSTILE_IMAGES = {
    "DDS with unknown pixel format flags (NotImplementedError)": _changed(IMAGES[6], 80, b"\x00\x00\x00\x20"),
    "SPIDER with a bad header (AttributeError)": _changed(IMAGES[7], 107, b"\x76"),
    "TIFF with StripOffsets of type UNDEFINED (TypeError)": _changed(IMAGES[4], 72, b"\x07"),
}


@pytest.mark.parametrize("data", HOSTILE_IMAGES.values(), ids=HOSTILE_IMAGES.keys())
def test_hostile_image_found_by_fuzzing_is_refused_as_unreadable(data):
    with pytest.raises(InvalidRequest, match=r"^invalid request: image=<\d+ bytes>: not a readable image file: "):
        parse_request({"prompt": "a cat", "image": data})


@PROPERTIES
@given(st.binary(max_size=256) | mangled_images())
def test_check_image_returns_a_size_within_bounds_or_raises_value_error(data):
    try:
        width, height = check_image(data)
    except ValueError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    assert 1 <= width <= MAX_IMAGE_SIDE and 1 <= height <= MAX_IMAGE_SIDE
