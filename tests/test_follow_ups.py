"""Jobs that follow jobs (`--after JOB_ID[:INDEX]`): a chain txt2img -> x4 upscale -> inpaint
through Redis, three worker pools (one model each), S3 and PostgreSQL, each follow-up queued by
the worker that recorded its parent (the sweeper where that missed); a follow-up waits for its
parent, is cancelled with the reason when its parent ends without images, and a follow-up of a
job that is missing, failed or too small is refused at submit with nothing written."""

from __future__ import annotations

import base64
import json
from contextlib import ExitStack

import numpy as np
import pytest
from PIL import Image

from tests.conftest import assert_refused, sdqueue_cli, sdqueue_worker
from tests.test_inpaint import png


def test_a_chain_txt2img_then_upscale_then_inpaint_succeeds_with_each_link_recorded(settings, client, tmp_path):
    import httpx

    from tests.test_api import serving
    from tests.test_end_to_end import pixels, s3_object

    with ExitStack() as pools:
        for model in ("tiny", "tiny-upscaler", "tiny-inpainting"):
            pools.enter_context(sdqueue_worker(model, tmp_path / f"worker-{model}.log"))
        first = sdqueue_cli("submit", "--prompt", "a lighthouse", "--model", "tiny", "--width", "256", "--height",
                            "256", "--num-inference-steps", "2", "--seed", "5")
        assert first.returncode == 0, first.stderr
        parent = first.stdout.strip()
        second = sdqueue_cli("submit", "--prompt", "a lighthouse, sharp", "--model", "tiny-upscaler", "--after",
                             f"{parent}:0", "--num-inference-steps", "2", "--seed", "6", "--noise-level", "10")
        assert second.returncode == 0, second.stderr
        upscaled = second.stdout.strip()
        assert client.get(upscaled)["state"] in ("waiting", "queued", "running", "succeeded")
        box = np.zeros((1024, 1024), dtype=np.uint8)
        box[256:768, 256:768] = 255
        with serving(settings.model_copy(update={"api_auth": "off"})) as url:
            answer = httpx.post(f"{url}/v1/jobs", json={
                "prompt": "a red door", "model": "tiny-inpainting", "after": {"job": upscaled, "index": 0},
                "mask": base64.b64encode(png(Image.fromarray(box, "L"))).decode(), "num_inference_steps": 2,
                "strength": 1.0, "seed": 7}, timeout=30)
            assert answer.status_code == 201, answer.text
            inpainted = answer.json()["id"]
            assert answer.json()["after"] == {"job": upscaled, "index": 0}
        records = {}
        for job_id in (parent, upscaled, inpainted):
            records[job_id] = client.wait(job_id, timeout=300)
            assert records[job_id]["state"] == "succeeded", (
                records[job_id], [(tmp_path / f"worker-{m}.log").read_text()[-2000:] for m in ("tiny-upscaler",)])
        # each link recorded both ways, and each follow-up's input is its parent's image
        assert records[parent]["followers"] == [upscaled] and records[parent]["after"] is None
        assert records[upscaled]["after"] == {"job": parent, "index": 0}
        assert records[upscaled]["followers"] == [inpainted]
        assert records[inpainted]["after"] == {"job": upscaled, "index": 0}
        assert (records[upscaled]["mode"], records[inpainted]["mode"]) == ("upscale", "inpaint")
        from models.tables import Job

        with client.db.session() as session:
            assert session.get(Job, upscaled).input_sha256 == records[parent]["images"][0]["sha256"]
            assert session.get(Job, inpainted).input_sha256 == records[upscaled]["images"][0]["sha256"]
        made = pixels(s3_object(settings, records[upscaled]["images"][0]["key"]))
        assert made.shape == (1024, 1024, 3)
        assert pixels(s3_object(settings, records[inpainted]["images"][0]["key"])).shape == (1024, 1024, 3)
        shown = sdqueue_cli("status", upscaled)
        assert f"after    job {parent} image 0" in shown.stdout and f"followed by {inpainted}" in shown.stdout
        # a follow-up made again from its record alone (its input read from its parent's image)
        again = sdqueue_cli("reproduce", upscaled, "--json", timeout=300)
        assert again.returncode == 0, (again.stdout, again.stderr)
        # a run: "generate, then upscale every image", one row's `then`
        manifest = tmp_path / "run.jsonl"
        manifest.write_text(json.dumps({"prompt": "a tree", "model": "tiny", "width": 256, "height": 256,
                                        "num_inference_steps": 2, "num_images": 2, "seed": 3,
                                        "then": {"model": "tiny-upscaler", "num_inference_steps": 2}}) + "\n")
        ran = sdqueue_cli("run", str(manifest), "--name", "then-run")
        assert ran.returncode == 0, ran.stderr
        with client.db.session() as session:
            from sqlalchemy import select

            from models.tables import Run

            run_id = session.scalar(select(Run.id).where(Run.name == "then-run"))
            rows = {job.run_key: job.id for job in session.scalars(select(Job).where(Job.run_id == run_id))}
        assert len(rows) == 3
        (generated,) = [job_id for key, job_id in rows.items() if ">then" not in key]
        for index in (0, 1):
            follower = next(job_id for key, job_id in rows.items() if key.endswith(f">then{index}"))
            record = client.wait(follower, timeout=300)
            assert record["state"] == "succeeded" and record["after"] == {"job": generated, "index": index}
            assert record["mode"] == "upscale"
            assert record["params"]["prompt"] == "a tree"  # the row's prompt, unless `then` names one


def test_a_follow_up_is_cancelled_with_the_reason_when_its_parent_is(settings, client):
    # sd21-base: no worker serves it here, so the parent waits in its queue until cancelled
    parent = client.submit({"prompt": "a cat", "model": "sd21-base", "width": 512, "height": 512})
    follower = client.submit({"prompt": "a cat", "model": "sd21-base", "after": {"job": parent, "index": 0}})
    grandchild = client.submit({"prompt": "a cat", "model": "sd21-base", "after": {"job": follower}})
    assert client.get(follower)["state"] == "waiting"
    assert client.get(follower)["params"]["width"] == 512  # a follow-up's size defaults to its input's
    client.cancel(parent)
    for job_id, before in ((follower, parent), (grandchild, follower)):
        record = client.get(job_id)
        assert record["state"] == "cancelled", record
        assert f"after: job {before}, the job it follows, cancelled" in record["error"]


@pytest.mark.parametrize(("after", "extra", "words"), [
    ("no-such-job", [], ["after.job='no-such-job': no such job"]),
    ("CANCELLED", [], ["that job cancelled", "may still succeed"]),
    ("PARENT:2", [], ["after.index=2: job", "makes 1 image(s), index 0..0"]),
    ("PARENT", ["--model", "tiny-upscaler"], ["image: 512x512 px = 262144 px is larger than the upscaler's input bound",
                                              "(the image of job"]),
    ("PARENT:x", [], ["--after", "JOB_ID:INDEX"]),
])
def test_a_bad_follow_up_is_refused_in_one_line_and_nothing_is_written(settings, client, trace, after, extra, words):
    parent = client.submit({"prompt": "a cat", "model": "sd21-base", "width": 512, "height": 512})
    cancelled = client.submit({"prompt": "a dog", "model": "sd21-base"})
    client.cancel(cancelled)
    after = after.replace("PARENT", parent).replace("CANCELLED", cancelled)
    assert_refused(trace, ["--prompt", "a cat", "--after", after, *extra], words)


def test_a_row_whose_then_does_not_fit_its_image_is_rejected_naming_the_bound(settings, tmp_path):
    from producer.runs.manifest import load_manifest

    manifest = tmp_path / "run.jsonl"
    rows = [{"prompt": "a", "model": "tiny", "width": 512, "height": 512, "then": {"model": "tiny-upscaler"}},
            {"prompt": "b", "model": "tiny", "then": {"model": "tiny-upscaler", "noise_level": 400}},
            {"prompt": "c", "model": "tiny", "then": {"image": "x.png"}},
            {"prompt": "d", "model": "tiny", "width": 256, "height": 256, "then": {"model": "tiny-upscaler"}}]
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    loaded = load_manifest(manifest, {}, settings=settings)
    assert len(loaded.rows) == 1 and [r.line for r in loaded.rejects] == [1, 2, 3]
    problems = [r.problems[0] for r in loaded.rejects]
    assert problems[0].startswith("then: image: 512x512 px = 262144 px is larger than the upscaler's input bound")
    assert problems[1].startswith("then.noise_level=400: ")
    assert problems[2].startswith("then.image: a follow-up's input is the row's image")
    (row,) = list(loaded.rows)
    assert row.then is not None and (row.then.width, row.then.height, row.then.noise_level) == (1024, 1024, 20)


def test_a_runs_cancel_takes_its_waiting_follow_ups_too_and_its_delete_waits_for_them(settings, client, tmp_path):
    from models.errors import RunBusy
    from producer.runs.enqueue import enqueue_run
    from producer.runs.manifest import load_manifest
    from producer.runs.status import cancel_run, delete_run, run_contents

    manifest = tmp_path / "run.jsonl"  # sd21-base: no worker here, so every job stays queued or waiting
    manifest.write_text(json.dumps({"prompt": "a cat", "model": "sd21-base", "width": 256, "height": 256,
                                    "num_images": 2, "then": {"model": "sd21-upscaler"}}) + "\n")
    enqueue_run(client, "then-cancel", load_manifest(manifest, {}, settings=settings))
    assert run_contents(client, "then-cancel").unfinished == 3
    with pytest.raises(RunBusy):
        delete_run(client, "then-cancel")
    assert cancel_run(client, "then-cancel", "queued") == 3  # the row's job and its two follow-ups
    assert delete_run(client, "then-cancel").jobs == 3
