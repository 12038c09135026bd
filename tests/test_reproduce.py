"""Reproduction: each image's pixel sha256, the AUTOMATIC1111 `parameters` chunk, `sdqueue reproduce`,
and the README's plain-diffusers snippet, against one small worker run of the tiny model."""

from __future__ import annotations

import contextlib
import io
import json
import re
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from models.images import pixel_sha256
from producer.cli import EXIT_NOT_FOUND, EXIT_USAGE, main
from tests.conftest import small
from worker.encode import a1111_parameters, read_record

TIMEOUT = 180
README = Path(__file__).resolve().parent.parent / "README.md"

# --- AUTOMATIC1111's infotext, parsed back as its WebUI parses it -------------------------------
# Written from parse_generation_parameters (modules/infotext_utils.py): the last line holds the
# parameters when it has at least 3 of them; lines before it are the prompt until one starts with
# "Negative prompt:"; a quoted value is JSON; a WxH value gives KEY-1 and KEY-2.

RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
RE_SIZE = re.compile(r"^(\d+)x(\d+)$")


def parse_infotext(text: str) -> dict[str, str]:
    *lines, last = text.strip().split("\n")
    if len(RE_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, negative_started = "", "", False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            negative_started = True
            line = line[16:].strip()
        if negative_started:
            negative += ("" if negative == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    found = {"Prompt": prompt, "Negative prompt": negative}
    for key, value in RE_PARAM.findall(last):
        if value[:1] == '"' and value[-1:] == '"':
            value = json.loads(value)
        size = RE_SIZE.match(value)
        if size is not None:
            found[f"{key}-1"], found[f"{key}-2"] = size.group(1), size.group(2)
        else:
            found[key] = value
    return found


def test_parameters_text_is_what_the_webui_parses():
    record = {"prompt": "a fox, at dusk\nsecond line", "negative_prompt": "blurry, text", "num_inference_steps": 25,
              "scheduler": "DPMSolverMultistepScheduler", "scheduler_config": {"use_karras_sigmas": True},
              "guidance_scale": 7.5, "seed": 7, "width": 768, "height": 512, "model": "sd21", "mode": "img2img",
              "strength": 0.6}
    text = a1111_parameters(record)
    assert text.splitlines()[-1] == ("Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 7, "
                                     "Size: 768x512, Model: sd21, Denoising strength: 0.6")
    parsed = parse_infotext(text)
    assert parsed["Prompt"] == "a fox, at dusk\nsecond line" and parsed["Negative prompt"] == "blurry, text"
    assert (parsed["Size-1"], parsed["Size-2"], parsed["Seed"]) == ("768", "512", "7")
    # no negative prompt: no line for it; a value with a colon or comma is quoted; unknown schedulers keep their name
    plain = a1111_parameters({**record, "negative_prompt": "", "mode": "txt2img", "model": "my: model, v2",
                              "scheduler": "DEISMultistepScheduler", "scheduler_config": {}})
    assert "Negative prompt" not in plain and "Denoising strength" not in plain
    parsed = parse_infotext(plain)
    assert parsed["Model"] == "my: model, v2" and parsed["Sampler"] == "DEISMultistepScheduler"


def test_pixel_sha256_is_of_the_decoded_rgb_bytes():
    pixels = np.random.default_rng(0).integers(0, 256, (8, 6, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).convert("RGBA").save(buf, format="PNG")  # decoded to RGB, as documented
    assert pixel_sha256(buf.getvalue()) == pixel_sha256(pixels) == pixel_sha256(np.asfortranarray(pixels))
    with pytest.raises(ValueError, match="uint8"):
        pixel_sha256(pixels.astype(np.float32))


# --- one worker run: a txt2img job of 2 images and an img2img job ---------------------------------

def reproduce(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["reproduce", *args])
    return code, out.getvalue(), err.getvalue()


def readme_snippet() -> str:
    text = README.read_text()
    block = text.split("<!-- reproduce-snippet -->", 1)[1].split("<!-- /reproduce-snippet -->", 1)[0]
    return block.split("```python\n", 1)[1].split("```", 1)[0]


def test_images_record_their_pixels_and_reproduce(settings, client, worker, png_bytes, tmp_path):
    from models.storage import open_storage

    storage = open_storage(settings.storage_url, endpoint_url=settings.s3_endpoint_url)
    # one after the other: each job runs alone in its loop, so its images are made again exactly
    txt = client.submit(small(prompt="a red fox, at dusk", negative_prompt="blurry", num_images=2, seed=41,
                              guidance_scale=6.0, num_inference_steps=2))
    records = {txt: client.wait(txt, timeout=TIMEOUT)}
    img = client.submit(small(prompt="a harbour", image=png_bytes(), strength=0.6, seed=9, num_inference_steps=3))
    records[img] = client.wait(img, timeout=TIMEOUT)
    assert all(r["state"] == "succeeded" for r in records.values()), [r["error"] for r in records.values()]

    # 1. each image: its pixel sha256 in the job record and the PNG's record, equal to the stored PNG's pixels;
    #    the `parameters` chunk as the WebUI reads it
    for job_id, record in records.items():
        for image in record["images"]:
            png = storage.get(image["key"])
            assert image["pixel_sha256"] == pixel_sha256(png) == read_record(png)["pixel_sha256"]
            with Image.open(io.BytesIO(png)) as opened:
                parsed = parse_infotext(opened.text["parameters"])  # type: ignore[attr-defined]
            assert parsed["Seed"] == str(image["seed"]) and parsed["Sampler"] == "Euler"
            assert (parsed["Size-1"], parsed["Size-2"], parsed["Model"]) == ("256", "256", "tiny")
            assert parsed["Steps"] == str(record["params"]["num_inference_steps"])
            assert parsed["CFG scale"] == str(record["params"]["guidance_scale"])
            assert parsed["Prompt"] == record["params"]["prompt"]
            assert parsed["Negative prompt"] == record["params"]["negative_prompt"]
            assert parsed.get("Denoising strength") == ("0.6" if job_id == img else None)

    # 2. `sdqueue reproduce`: both jobs equal, every image
    code, out, err = reproduce(txt)
    assert code == 0, err
    assert [line.split(":")[0] for line in out.splitlines()[1:]] == ["image 0 (seed 41)", "image 1 (seed 42)"]
    assert all("equal" in line for line in out.splitlines()[1:]), out
    code, out, err = reproduce(img, "--json")
    assert code == 0, err
    found = json.loads(out)
    assert found["ok"] and found["batching"] == "continuous" and found["images"][0]["equal"], found

    # ... and an image made by window batching is made again in a window batch (the record says which)
    from sqlalchemy import update

    from models.db import Database
    from models.tables import Image as ImageRow

    db = Database(settings.database_url)
    with db.session() as session:
        session.execute(update(ImageRow).where(ImageRow.job_id == txt).values(steps_run=None, batch_size=2))
    db.dispose()
    code, out, err = reproduce(txt, "--json")
    found = json.loads(out)
    assert code == 0 and found["batching"] == "window" and all(i["equal"] for i in found["images"]), (found, err)

    # 3. --out writes the re-made image once; again only with --force
    made = tmp_path / "again.png"
    assert reproduce(txt, "--index", "1", "--out", str(made))[0] == 0
    assert pixel_sha256(made.read_bytes()) == records[txt]["images"][1]["pixel_sha256"]
    code, _, err = reproduce(txt, "--index", "1", "--out", str(made))
    assert code == EXIT_USAGE and "--force" in err

    # 4. the README's plain-diffusers snippet, on the fetched PNG, gives the same pixels
    [path] = [p for p in client.fetch(txt, tmp_path / "fetched") if p.name.endswith("-1.png")]
    snippet = readme_snippet().replace('"JOB-1.png"', repr(str(path)))
    namespace: dict[str, Any] = {}
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        exec(compile(snippet, str(README), "exec"), namespace)  # noqa: S102 (our own README)
    assert printed.getvalue().strip() == "equal"
    assert pixel_sha256(np.asarray(namespace["image"].convert("RGB"))) == records[txt]["images"][1]["pixel_sha256"]

    # 5. one-line errors: no such job, no such image, an image gone from storage
    code, _, err = reproduce(str(uuid.uuid4()))
    assert code == EXIT_NOT_FOUND and err.count("\n") == 1 and "no job" in err
    code, _, err = reproduce(img, "--index", "2")
    assert code == EXIT_NOT_FOUND and "no image 2" in err and err.count("\n") == 1
    storage.delete(records[img]["images"][0]["key"])
    code, _, err = reproduce(img)
    assert code == EXIT_NOT_FOUND and "missing from storage" in err and err.count("\n") == 1
