"""Depth-to-image in the continuous loop (worker/loop.py) against diffusers' own
StableDiffusionDepth2ImgPipeline, on tiny-depth (a 5-channel UNet and a tiny DPT depth estimator,
built offline by worker/build.py), and depth jobs end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import assert_refused, max_diff, sdqueue_cli, sdqueue_worker
from tests.test_inpaint import png
from tests.test_loop import SIZE, picture
from worker.loop import ContinuousLoop, drain
from worker.samples import ConditioningCache, Prompt, Sample


@pytest.fixture(scope="module")
def depth(data_dir):  # type: ignore[no-untyped-def]
    """tiny-depth, as `sdqueue models build-tiny` built it into the session's data dir, on the CPU."""
    from models.registry import resolve_model
    from worker.pipeline import load_model

    return load_model(resolve_model("tiny-depth", data_dir), "cpu")


def depth_png(kind: str = "L") -> bytes:
    """A caller's depth map: a ramp, near at the bottom; 8-bit greyscale, or 16-bit at another size."""
    if kind == "L":
        return png(Image.fromarray(np.linspace(0, 255, SIZE)[:, None].repeat(SIZE, 1).astype("uint8")))
    ramp = np.linspace(0, 65535, 96)[:, None].repeat(160, 1) * np.linspace(0.5, 1, 160)[None, :]
    return png(Image.fromarray(ramp.astype("uint16")))


def as_tensor(data: bytes) -> torch.Tensor:
    """The map as a caller hands it to diffusers: its greyscale values, [1, H, W]."""
    import io

    with Image.open(io.BytesIO(data)) as img:
        values = np.asarray(img if img.mode.startswith("I") else img.convert("L"), dtype=np.float32)
    return torch.from_numpy(values)[None]


def samples(job_id: str, prompt: str, seed: int, count: int, guidance: float, image: Image.Image,
            depth_map: bytes | None = None, strength: float = 0.8) -> list[Sample]:
    from worker.inputs import prepare_depth_map

    prepared = prepare_depth_map(depth_map) if depth_map is not None else None
    return [Sample(job_id, i, seed + i, Prompt(prompt, "", False), guidance, image, strength=strength, depth=True,
                   depth_map=prepared) for i in range(count)]


def diffusers_depth(model, prompt, seed, steps, guidance, image, strength, depth_map=None):  # type: ignore[no-untyped-def]
    import warnings

    with warnings.catch_warnings():  # the pipeline runs its DPT under autocast: in float32 on the CPU torch warns
        warnings.filterwarnings("ignore", "In CPU autocast, but the target dtype is not supported", UserWarning)
        return model.depth(prompt=prompt, image=image, depth_map=None if depth_map is None else as_tensor(depth_map),
                           strength=strength, num_inference_steps=steps, guidance_scale=guidance, output_type="pil",
                           generator=torch.Generator("cpu").manual_seed(seed)).images[0]


def test_depth_samples_in_one_loop_each_equal_diffusers_alone(depth):
    cache = ConditioningCache(depth)
    loop = ContinuousLoop(depth, SIZE, SIZE)
    a = samples("a", "a red sofa", 5, 2, 6.0, picture(0))  # the map estimated by the model's DPT
    b = samples("b", "a window", 9, 1, 1.0, picture(1), depth_png("L"), strength=1.0)  # unguided, the caller's map
    loop.admit(a, cache.get([s.prompt for s in a]), steps=4, strength=0.8)
    loop.admit(b, cache.get([s.prompt for s in b]), steps=4, strength=1.0)
    loop.step()  # c joins a loop already running, with its own steps, strength and 16-bit map of another size
    c = samples("c", "a lamp", 3, 1, 7.5, picture(2), depth_png("I;16"), strength=0.6)
    loop.admit(c, cache.get([s.prompt for s in c]), steps=6, strength=0.6)
    assert loop.active[0].extra.shape == (1, 1, SIZE // 8, SIZE // 8)
    images = {(s.job_id, s.sample.index): image for s, image in drain(loop)}
    for index in (0, 1):
        assert max_diff(images["a", index], diffusers_depth(depth, "a red sofa", 5 + index, 4, 6.0, picture(0), 0.8)) <= 1
    assert max_diff(images["b", 0], diffusers_depth(depth, "a window", 9, 4, 1.0, picture(1), 1.0, depth_png("L"))) <= 1
    assert max_diff(images["c", 0], diffusers_depth(depth, "a lamp", 3, 6, 7.5, picture(2), 0.6,
                                                    depth_png("I;16"))) <= 1
    # the estimate is the image's own: another image's makes another picture
    assert max_diff(images["a", 0], diffusers_depth(depth, "a red sofa", 5, 4, 6.0, picture(0), 0.8,
                                                    depth_png("L"))) > 1


def test_a_window_batch_of_depth_samples_equals_diffusers_alone_and_other_loops_refuse_them(depth, model):
    from worker.batch import generate_batch
    from worker.samples import compat_key

    key = compat_key({"width": SIZE, "height": SIZE, "num_inference_steps": 4, "strength": 0.7}, img2img=True,
                     depth=True)
    assert (key.mode, key.start_step) == ("depth", 2)
    batch = samples("w", "a blue door", 20, 2, 5.0, picture(4), strength=0.7)
    results = generate_batch(depth, key, batch, ConditioningCache(depth).get([s.prompt for s in batch]))
    for i, image in enumerate(results):
        assert max_diff(image, diffusers_depth(depth, "a blue door", 20 + i, 4, 5.0, picture(4), 0.7)) <= 1
    other = ContinuousLoop(model, SIZE, SIZE)  # tiny: a 4-channel UNet
    with pytest.raises(ValueError, match="no depth samples"):
        other.admit(batch, ConditioningCache(model).get([s.prompt for s in batch]), steps=4, strength=0.7)
    plain = [Sample("p", 0, 1, Prompt("a cat", "", False), 7.5, picture(0), strength=0.5)]
    with pytest.raises(ValueError, match="depth samples only"):
        ContinuousLoop(depth, SIZE, SIZE).admit(plain, ConditioningCache(depth).get([plain[0].prompt]), steps=3,
                                                strength=0.5)


# ---------------------------------------------------------------- end to end


def test_depth_jobs_run_end_to_end_from_the_cli_the_api_and_a_manifest(settings, client, depth, tmp_path):
    import base64
    import hashlib
    import json
    import subprocess
    import sys

    import httpx
    from sqlalchemy import select

    from models.tables import Job, Run
    from producer.cli import main
    from tests.test_api import serving
    from tests.test_end_to_end import pixels, s3_object

    image, ramp, deep = png(picture(2)), depth_png("L"), depth_png("I;16")
    for name, data in (("room.png", image), ("depth.png", ramp), ("deep.png", deep)):
        (tmp_path / name).write_bytes(data)
    common = {"width": 256, "height": 256, "num_inference_steps": 3, "model": "tiny-depth"}
    with sdqueue_worker("tiny-depth", tmp_path / "worker.log"):
        cli = subprocess.run([sys.executable, "-m", "producer.cli", "submit", "--prompt", "a red sofa", "--model",
                              "tiny-depth", "--image", str(tmp_path / "room.png"), "--depth-map",
                              str(tmp_path / "depth.png"), "--width", "256", "--height", "256",
                              "--num-inference-steps", "3", "--seed", "11", "--strength", "0.9"],
                             capture_output=True, text=True, timeout=120)
        assert cli.returncode == 0, cli.stderr
        ids = [cli.stdout.strip()]
        with serving(settings.model_copy(update={"api_auth": "off"})) as url:
            as_json = {"prompt": "a lamp", "seed": 12, "image": base64.b64encode(image).decode(), **common}
            answer = httpx.post(f"{url}/v1/jobs", json=as_json, timeout=30)  # its map estimated
            assert answer.status_code == 201, answer.text
            ids.append(answer.json()["id"])
            form = {name: str(value) for name, value in {"prompt": "a plant", "seed": 13, **common}.items()}
            answer = httpx.post(f"{url}/v1/jobs", data=form, files={"image": ("room.png", image, "image/png"),
                                                                    "depth_map": ("deep.png", deep, "image/png")},
                                timeout=30)
            assert answer.status_code == 201, answer.text
            ids.append(answer.json()["id"])
            flat = png(Image.new("L", (64, 64), 40))  # one depth: nothing to stretch over -1..1
            refused = httpx.post(f"{url}/v1/jobs", json={**as_json, "depth_map": base64.b64encode(flat).decode()},
                                 timeout=30)
            assert refused.status_code == 422 and "every pixel is 40" in refused.text
        manifest = tmp_path / "run.jsonl"
        manifest.write_text(json.dumps({"prompt": "a chair", "image": "room.png", "depth_map": "depth.png",
                                        "seed": 14, **common}) + "\n")
        assert main(["run", str(manifest), "--name", "depth-run"]) == 0
        with client.db.session() as session:
            run_id = session.scalar(select(Run.id).where(Run.name == "depth-run"))
            ids.append(session.scalar(select(Job.id).where(Job.run_id == run_id)))
        maps = [hashlib.sha256(ramp).hexdigest(), None, hashlib.sha256(deep).hexdigest(), hashlib.sha256(ramp).hexdigest()]
        for job_id, sha256 in zip(ids, maps):
            record = client.wait(job_id, timeout=240)
            assert record["state"] == "succeeded", (record, (tmp_path / "worker.log").read_text()[-3000:])
            assert record["mode"] == "depth" and record["model"] == "tiny-depth"
            assert record["depth_sha256"] == sha256
            assert "depth_map" not in record["params"]
        # the CLI's job: the image diffusers' own pipeline makes of it alone, its PNG naming mode and map
        first = client.get(ids[0])
        stored = s3_object(settings, first["images"][0]["key"])
        expected = diffusers_depth(depth, "a red sofa", 11, 3, 7.5, picture(2), 0.9, ramp)
        assert max_diff(pixels(stored), expected) <= 1
        from worker.encode import read_record

        embedded = read_record(stored)
        assert (embedded["mode"], embedded["depth_sha256"]) == ("depth", maps[0])
        # made again from its record alone: the same pixels (the map estimated again)
        again = sdqueue_cli("reproduce", ids[1], "--json", timeout=300)
        assert again.returncode == 0, (again.stdout, again.stderr)


@pytest.mark.parametrize(("args", "words"), [
    (["--model", "tiny", "--image", "IMAGE", "--depth-map", "DEPTH"],
     ["depth_map is for depth models", "model tiny runs txt2img, img2img"]),
    (["--model", "tiny-depth"], ["image required", "model tiny-depth"]),
    (["--model", "tiny-depth", "--image", "IMAGE", "--depth-map", "BROKEN"],
     ["depth_map=<", "not a readable image file"]),
    (["--model", "tiny-depth", "--image", "IMAGE", "--depth-map", "DEPTH", "--strength", "1.5"],
     ["strength=1.5", "less than or equal to 1"]),
])
def test_bad_depth_input_is_refused_in_one_line_and_nothing_is_written(settings, trace, tmp_path, args, words):
    files = {"IMAGE": png(picture(3)), "DEPTH": depth_png(), "BROKEN": depth_png()[:100]}
    for name, data in files.items():
        (tmp_path / f"{name}.png").write_bytes(data)
    args = [str(tmp_path / f"{a}.png") if a in files else a for a in args]
    assert_refused(trace, ["--prompt", "a cat", "--width", "256", "--height", "256", *args], words)


def test_a_manifest_checks_a_file_as_a_depth_map_where_a_row_uses_it_as_one(tmp_path):
    import json

    from producer.runs.manifest import load_manifest

    (tmp_path / "flat.png").write_bytes(png(Image.new("L", (SIZE, SIZE), 9)))  # a fine image, and no depth map
    (tmp_path / "depth.png").write_bytes(depth_png())
    rows = [{"prompt": "a", "image": "flat.png"}, {"prompt": "b", "image": "flat.png", "depth_map": "flat.png"},
            {"prompt": "c", "image": "flat.png", "depth_map": "depth.png"}]
    (tmp_path / "run.jsonl").write_text("".join(json.dumps({**row, "model": "tiny-depth", "width": SIZE,
                                                             "height": SIZE}) + "\n" for row in rows))
    manifest = load_manifest(tmp_path / "run.jsonl")
    assert len(manifest.rows) == 2 and [r.line for r in manifest.rejects] == [2]
    assert manifest.rejects[0].problems == [f"depth_map={str(tmp_path / 'flat.png')!r}: every pixel is 9: a depth "
                                            "map needs at least two depths (its darkest is taken as the farthest, its "
                                            "brightest as the nearest)"]
    good = list(manifest.rows)
    assert [r.request.mode for r in good] == ["depth", "depth"]
    assert good[0].depth_map_path is None and good[1].request.depth_map == depth_png()


def test_a_checkpoint_naming_dpt_feature_extractor_loads(data_dir, tmp_path):
    """stable-diffusion-2-depth's model_index.json names DPTFeatureExtractor, gone from transformers 5."""
    import json
    import shutil

    from models.registry import spec_for_folder
    from worker.pipeline import load_model

    folder = shutil.copytree(data_dir / "models" / "tiny-depth", tmp_path / "sd2-depth-like")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "feature_extractor": ["transformers",
                                                                                         "DPTFeatureExtractor"]}))
    loaded = load_model(spec_for_folder(folder), "cpu")
    assert loaded.spec.modes == ("depth",) and loaded.depth is not None
    assert type(loaded.depth.feature_extractor).__name__.startswith("DPTImageProcessor")
