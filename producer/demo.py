"""`sdqueue demo`: a handful of jobs through the real Celery task path, on embedded defaults.

SQLite, a local folder, the in-process broker and a worker thread in this process: no services.
This is one of the CLI's worker commands: it composes both sides, so it imports the worker
lazily, inside run_demo, and importing this module alone loads neither torch nor the worker.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from models.db import upgrade
from models.errors import ModelUnavailable
from models.constants import worker_queues
from models.registry import REGISTRY, model_key, resolve_model
from models.settings import load_settings
from producer.client import Client

DEMO_JOBS: list[dict[str, Any]] = [
    {"prompt": "a lighthouse on a cliff at sunset, oil painting", "seed": 1, "num_inference_steps": 20},
    {"prompt": "a watercolor fox in the snow", "negative_prompt": "blurry, text", "width": 512, "height": 512,
     "num_images": 2, "seed": 42, "num_inference_steps": 20},
    {"prompt": "a city street at night, neon signs, rain", "width": 896, "height": 512, "guidance_scale": 9.0,
     "num_inference_steps": 20},
    {"prompt": "a (red)++ cat on a (blue)-- sofa", "use_compel": True, "width": 512, "height": 512, "seed": 7,
     "num_inference_steps": 20},
    {"prompt": '("a castle", "a forest").blend(0.6, 0.4)', "use_compel": True, "width": 640, "height": 640,
     "num_inference_steps": 20},
]


def starter_image(width: int = 768, height: int = 768) -> bytes:
    """A simple drawn picture to start the img2img job from."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), (40, 70, 140))
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, height * 2 // 3, width, height), fill=(60, 140, 60))
    draw.ellipse((width // 2 - 90, height // 5, width // 2 + 90, height // 5 + 180), fill=(250, 210, 60))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def choose_model(requested: str, data_dir: Path) -> str:
    """The requested model when its weights can be had; else say so plainly and use tiny."""
    from worker.pipeline import locate_weights

    try:
        spec = resolve_model(requested, data_dir)
        if spec.random_weights and not (spec.local_dir and (spec.local_dir / "model_index.json").is_file()):
            _build(spec.name, data_dir)
        locate_weights(spec)
        return requested
    except ModelUnavailable as exc:
        print(f"sdqueue demo: {exc}.")
        print("sdqueue demo: running on the TINY model instead: random weights, its images are noise, "
              "not Stable Diffusion. (Ask for it with --model tiny to skip this notice.)")
        _build("tiny", data_dir)
        return "tiny"


def _build(name: str, data_dir: Path) -> None:
    from models.registry import built_models_dir
    from worker.build import build_and_save

    folder = built_models_dir(data_dir) / name
    if not (folder / "model_index.json").is_file():
        print(f"sdqueue demo: building the {name} model into {folder} ...")
        build_and_save(name, folder)


def run_demo(model: str, workdir: Path) -> int:
    from celery.contrib.testing.worker import start_worker

    from worker.app import configure
    from worker.tasks import generate, reset_context

    workdir = workdir.resolve()
    model = choose_model(model, workdir)
    settings = load_settings(
        data_dir=workdir,
        broker_url="memory://",
        database_url=f"sqlite:///{workdir / 'sdqueue.db'}",
        storage_url=(workdir / "storage").as_uri(),
        model=model,
        default_model=model,  # its jobs go to the model its worker pins, whatever SDQUEUE_DEFAULT_MODEL says
        metrics_port=0,  # one process, gone in a minute: nothing to scrape
    )
    upgrade(settings.database_url)
    app = configure(settings)
    reset_context()
    print(f"sdqueue demo: model {model} ({REGISTRY[model].description if model in REGISTRY else model}), "
          f"database {settings.database_url}, images under {workdir / 'storage'}")
    client = Client(settings, sender=app)
    requests = DEMO_JOBS + [
        {"prompt": "a sunny meadow with a tree, detailed", "image": starter_image(), "strength": 0.7, "seed": 3,
         "num_inference_steps": 20},
    ]
    generate.context  # noqa: B018  (load the pipeline before the worker takes jobs)
    with start_worker(app, pool="threads", concurrency=settings.worker_slots, perform_ping_check=False,
                      shutdown_timeout=600,
                      queues=worker_queues(settings.queue, model_key(settings.model))):
        job_ids = [client.submit(request) for request in requests]
        records = [client.wait(job_id, timeout=3600) for job_id in job_ids]
    reset_context()
    _print_table(records)
    client.close()
    return 0 if all(r["state"] == "succeeded" for r in records) else 1


def _print_table(records: list[dict[str, Any]]) -> None:
    print()
    print(f"{'job':8}  {'state':9}  {'mode':7}  {'size':8}  {'seed':>10}  image")
    for record in records:
        params = record["params"]
        size = f"{params['width']}x{params['height']}"
        head = f"{record['id'][:8]}  {record['state']:9}  {record['mode']:7}  {size:8}"
        if not record["images"]:
            print(f"{head}  {record['seed']:>10}  {record['error'] or ''}")
        for image in record["images"]:
            print(f"{head}  {image['seed']:>10}  {image['location']}")
            head = " " * len(head)
    print()
