"""Every bound of the request table, wrong types, empty prompts and bad images: each refused
with an error naming the field, the value and the bound, and nothing written or enqueued."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
from PIL import Image

from models.errors import InvalidRequest
from models.request import MAX_SEED, SIZES, parse_request

BAD = [
    # field, value, words the error must hold
    ("num_images", 0, ["num_images=0", "greater than or equal to 1"]),
    ("num_images", 5, ["num_images=5", "less than or equal to 4"]),
    ("num_inference_steps", 0, ["num_inference_steps=0", "greater than or equal to 1"]),
    ("num_inference_steps", 513, ["num_inference_steps=513", "less than or equal to 512"]),
    ("guidance_scale", 0.99, ["guidance_scale=0.99", "greater than or equal to 1"]),
    ("guidance_scale", 20.5, ["guidance_scale=20.5", "less than or equal to 20"]),
    ("guidance_scale", float("nan"), ["guidance_scale=nan"]),
    ("strength", -0.1, ["strength=-0.1", "greater than or equal to 0"]),
    ("strength", 1.01, ["strength=1.01", "less than or equal to 1"]),
    ("width", 192, ["width=192", "multiple of 64 from 256 to 1024"]),
    ("width", 1088, ["width=1088", "multiple of 64 from 256 to 1024"]),
    ("width", 700, ["width=700", "multiple of 64"]),
    ("height", 200, ["height=200", "multiple of 64 from 256 to 1024"]),
    ("height", 1280, ["height=1280", "multiple of 64"]),
    ("seed", -1, ["seed=-1", "greater than or equal to 0"]),
    ("seed", MAX_SEED + 1, [f"seed={MAX_SEED + 1}", "less than or equal to"]),
    ("prompt", "", ["prompt=''"]),
    ("prompt", "   ", ["prompt='   '", "empty"]),
    # wrong types
    ("num_images", "2", ["num_images='2'", "valid integer"]),
    ("num_images", 2.5, ["num_images=2.5", "valid integer"]),
    ("num_images", True, ["num_images=True", "valid integer"]),
    ("num_inference_steps", None, ["num_inference_steps=None"]),
    ("guidance_scale", "high", ["guidance_scale='high'", "should be a number"]),
    ("strength", True, ["strength=True", "should be a number"]),
    ("width", "768", ["width='768'", "valid integer"]),
    ("seed", 1.5, ["seed=1.5"]),
    ("use_compel", "yes", ["use_compel='yes'", "valid boolean"]),
    ("prompt", 42, ["prompt=42", "valid string"]),
    ("negative_prompt", ["a"], ["negative_prompt=['a']", "valid string"]),
    ("image", b"this is not an image", ["image=<20 bytes>", "not a readable image file"]),
    ("colour", "red", ["colour is not a request field"]),
]


@pytest.mark.parametrize(("field", "value", "words"), BAD, ids=[f"{f}={v!r}"[:40] for f, v, _ in BAD])
def test_out_of_bounds_is_refused_naming_field_value_and_bound(field, value, words):
    with pytest.raises(InvalidRequest) as caught:
        parse_request({"prompt": "a cat", field: value})
    message = str(caught.value)
    for word in words:
        assert word in message, message


def test_missing_prompt():
    with pytest.raises(InvalidRequest, match="prompt is required"):
        parse_request({"num_images": 2})


def test_every_problem_is_reported_at_once():
    with pytest.raises(InvalidRequest) as caught:
        parse_request({"prompt": "", "num_images": 9, "width": 100})
    assert len(caught.value.problems) == 3


@pytest.mark.parametrize(("field", "value"), [
    ("num_images", 1), ("num_images", 4), ("num_inference_steps", 1), ("num_inference_steps", 512),
    ("guidance_scale", 1), ("guidance_scale", 20.0), ("strength", 0), ("strength", 1.0),
    ("width", 256), ("width", 1024), ("height", 256), ("height", 1024), ("seed", 0), ("seed", MAX_SEED),
    ("use_compel", True),
])
def test_bounds_themselves_are_accepted(field, value):
    assert getattr(parse_request({"prompt": "a cat", field: value}), field) == value


def test_defaults_follow_the_request_table():
    request = parse_request({"prompt": "a cat"})
    assert request.parameters() == {
        "prompt": "a cat", "negative_prompt": "", "num_images": 1, "num_inference_steps": 25,
        "guidance_scale": 7.5, "strength": 0.8, "width": 768, "height": 768, "seed": None, "use_compel": False,
        "model": None,
    }
    assert request.mode == "txt2img"
    assert len(SIZES) == 13


def huge_png(side: int = 20000) -> bytes:
    return _png_of_size(side, side)  # 1 bit per pixel: a small file, a huge image


def test_huge_image_is_refused_before_decoding():
    with pytest.raises(InvalidRequest, match=r"image=<\d+ bytes>: image is larger than the bound of 4096x4096 px"):
        parse_request({"prompt": "a cat", "image": huge_png()})


def test_large_image_within_pillow_limits_is_refused_by_size():
    with pytest.raises(InvalidRequest, match=r"5000x300 px is larger than the bound of 4096x4096 px"):
        parse_request({"prompt": "a cat", "image": _png_of_size(5000, 300)})


def _png_of_size(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("1", (width, height)).save(buf, format="PNG")
    return buf.getvalue()


def test_truncated_image_is_refused(png_bytes):
    data = png_bytes()
    with pytest.raises(InvalidRequest, match="not a readable image file"):
        parse_request({"prompt": "a cat", "image": data[: len(data) // 2]})


def test_real_image_makes_img2img(png_bytes):
    assert parse_request({"prompt": "a cat", "image": png_bytes(fmt="JPEG")}).mode == "img2img"


# --- nothing is written or enqueued -------------------------------------------------------




def test_client_refusal_leaves_no_trace(client, trace, png_bytes):
    before = trace()
    for bad in ({"prompt": "a cat", "num_images": 5}, {"prompt": "", "image": png_bytes()},
                {"prompt": "a cat", "image": huge_png()}, {"prompt": "a cat", "image": b"GIF89a-nope"}):
        with pytest.raises(InvalidRequest):
            client.submit(bad)
    assert trace() == before


def sdqueue(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "producer.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("args", "words"), [
    (["--num-images", "5"], ["num_images=5", "less than or equal to 4"]),
    (["--width", "100"], ["width=100", "multiple of 64 from 256 to 1024"]),
    (["--guidance-scale", "25"], ["guidance_scale=25.0", "less than or equal to 20"]),
    (["--strength", "2"], ["strength=2.0", "less than or equal to 1"]),
    (["--num-inference-steps", "0"], ["num_inference_steps=0", "greater than or equal to 1"]),
    (["--seed", "-3"], ["seed=-3", "greater than or equal to 0"]),
    (["--num-images", "two"], ["--num-images", "invalid int value: 'two'"]),
    (["--guidance-scale", "x"], ["--guidance-scale", "invalid float value"]),
])
def test_cli_refusal_is_one_clear_line_and_leaves_no_trace(settings, trace, args, words):
    before = trace()
    result = sdqueue("submit", "--prompt", "a cat", *args)
    assert result.returncode == 2
    for word in words:
        assert word in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert trace() == before


def test_cli_refuses_bad_image_files(settings, trace, tmp_path):
    before = trace()
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not an image")
    huge = tmp_path / "huge.png"
    huge.write_bytes(huge_png())
    cases = [
        (text_file, "not a readable image file"),
        (huge, "larger than the bound of 4096x4096 px"),
        (tmp_path / "missing.png", "cannot be read"),
    ]
    for path, words in cases:
        result = sdqueue("submit", "--prompt", "a cat", "--image", str(path))
        assert result.returncode == 2 and words in result.stderr and "image=" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    empty = sdqueue("submit", "--prompt", "  ")
    assert empty.returncode == 2 and "prompt='  '" in empty.stderr
    assert trace() == before
