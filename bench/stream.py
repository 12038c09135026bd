"""Benchmark: a stream of jobs through the producer, Redis and a real `sdqueue worker`.

Submits a stream (mixed: several sizes and step counts, num_images 1-4, varied guidance, a share
of img2img; or uniform: all at the model's native size and 25 steps) into Redis, lets a
`sdqueue worker` process serve it, and reports images/s, job latency p50/p95, the batch-size
histogram and the GPU memory peak. In the same run, on the same model and device, it measures
  - direct: the worker's batch function called on the very batches the worker recorded (what
    the queue, encoding and uploads cost on top), and
  - baseline: one diffusers pipeline call per job, what a hand-written Celery + diffusers worker does.
Prints the figures and writes them, with the machine's name, to a JSON file.

  CPU:  python bench/stream.py --model tiny
  GPU:  python bench/stream.py --model sd21-arch --scenario both     (builds sd21-arch if missing)

Needs Redis (SDQUEUE_BROKER_URL or --broker-url); the database and storage are a SQLite file and a
folder in a scratch directory unless SDQUEUE_DATABASE_URL / SDQUEUE_STORAGE_URL say otherwise.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.db import Database, upgrade  # noqa: E402
from models.registry import built_models_dir, resolve_model  # noqa: E402
from models.settings import load_settings  # noqa: E402
from models.tables import Batch, Job  # noqa: E402

# (sizes, step counts, jobs) per model: the tiny model on a CPU must finish in a few minutes too.
PROFILES = {
    "cpu": {"sizes": [256, 320, 384], "steps": [4, 6], "native": 384, "native_steps": 6, "jobs": 40},
    "gpu": {"sizes": [512, 640, 768], "steps": [20, 25], "native": 768, "native_steps": 25, "jobs": 32},
}


def starter_png(size: int) -> bytes:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (40, 70, 140))
    ImageDraw.Draw(img).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=(250, 210, 60))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def make_stream(scenario: str, profile: dict[str, Any], count: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    prompts = ["a lighthouse at dusk", "a watercolor fox", "a city street at night, neon", "a bowl of fruit",
               "a (red)++ cat on a sofa", "a mountain lake, morning fog"]
    stream = []
    for i in range(count):
        prompt = rng.choice(prompts)
        if scenario == "uniform":
            width = height = profile["native"]
            steps = profile["native_steps"]
        else:
            width, height = rng.choice(profile["sizes"]), rng.choice(profile["sizes"])
            steps = rng.choice(profile["steps"])
        request = {"prompt": prompt, "width": width, "height": height, "num_inference_steps": steps,
                   "num_images": rng.randint(1, 4), "guidance_scale": rng.choice([5.0, 7.5, 9.0]),
                   "negative_prompt": rng.choice(["", "blurry, low quality"]), "seed": rng.randrange(2**31),
                   "use_compel": "++" in prompt}
        if scenario == "mixed" and i % 6 == 5:
            request.update(image=starter_png(width), strength=rng.choice([0.6, 0.8]))
        stream.append(request)
    return stream


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def machine() -> dict[str, Any]:
    import torch

    info = {"host": platform.node(), "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    else:
        try:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                               if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    return info


def run_worker_stream(settings_env: dict[str, str], stream: list[dict[str, Any]], workdir: Path,
                      timeout: float) -> dict[str, Any]:
    """Serve `stream` with a real `sdqueue worker` process; figures from the database rows."""
    from producer.client import Client

    settings = load_settings()
    client = Client(settings)
    log_path = workdir / f"worker-{uuid.uuid4().hex[:6]}.log"
    worker = subprocess.Popen([sys.executable, "-m", "producer.cli", "worker", "--loglevel", "WARNING"],
                              stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, env={**os.environ, **settings_env},
                              start_new_session=True)
    try:
        # warm-up: one job per shape the stream uses, so first-call costs stay out of the figures
        shapes = {(r["width"], r["height"], r["num_inference_steps"], "image" in r) for r in stream}
        warm = []
        for width, height, steps, img2img in shapes:
            request = {"prompt": "warm-up", "width": width, "height": height, "num_inference_steps": steps, "seed": 0}
            if img2img:
                request.update(image=starter_png(width))
            warm.append(client.submit(request))
        for job_id in warm:
            if client.wait(job_id, timeout=timeout)["state"] != "succeeded":
                raise RuntimeError(f"warm-up job failed; worker log: {log_path.read_text()[-2000:]}")
        started = time.time()
        job_ids = [client.submit(request) for request in stream]
        records = [client.wait(job_id, timeout=timeout) for job_id in job_ids]
    finally:
        os.killpg(worker.pid, 15)
        worker.wait(timeout=120)
    failed = [r for r in records if r["state"] != "succeeded"]
    if failed:
        raise RuntimeError(f"{len(failed)} job(s) failed, e.g. {failed[0]['error']}")
    db = Database(settings.database_url)
    with db.session() as session:
        rows = session.query(Job).filter(Job.id.in_(job_ids)).all()
        latencies = [(j.finished_at - j.created_at).total_seconds() for j in rows]
        finished = max(j.finished_at for j in rows).timestamp()
        batch_ids = {i["batch_id"] for r in records for i in r["images"]}
        batches = session.query(Batch).filter(Batch.id.in_(batch_ids)).order_by(Batch.started_at).all()
        batch_list = [(b.id, b.size, b.jobs, b.seconds, b.peak_memory_bytes) for b in batches]
    db.dispose()
    client.close()
    images = sum(r["num_images"] for r in stream)
    wall = finished - started
    peaks = [b[4] for b in batch_list if b[4]]
    return {
        "jobs": len(stream), "images": images, "wall_s": round(wall, 3), "images_per_s": round(images / wall, 4),
        "latency_p50_s": round(percentile(latencies, 0.5), 3), "latency_p95_s": round(percentile(latencies, 0.95), 3),
        "batches": len(batch_list), "batch_size_histogram": dict(sorted(Counter(b[1] for b in batch_list).items())),
        "jobs_per_batch_histogram": dict(sorted(Counter(b[2] for b in batch_list).items())),
        "gpu_peak_memory_GB": round(max(peaks) / 1e9, 2) if peaks else None,
        "batch_ids": [b[0] for b in batch_list],
    }


def run_direct(settings: Any, batch_ids: list[str]) -> tuple[dict[str, Any], Any]:
    """The worker's batch function on the batches the worker recorded, back to back, in this process."""
    import torch

    from models.storage import open_storage
    from worker.engine import Engine
    from worker.pipeline import load_model
    from worker.replay import replay_batch

    model = load_model(resolve_model(settings.model, settings.data_dir), settings.device)
    db = Database(settings.database_url)
    storage = open_storage(settings.storage_url, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region)
    engine = Engine(model, db, storage, "bench", pixel_budget=10**9, window=0)
    replay_batch(engine, db, storage, batch_ids[0])  # warm-up
    sync = torch.cuda.synchronize if model.device.startswith("cuda") else (lambda: None)
    sync()
    started = time.perf_counter()
    images = sum(len(replay_batch(engine, db, storage, batch_id)) for batch_id in batch_ids)
    sync()
    seconds = time.perf_counter() - started
    engine.stop()
    db.dispose()
    return {"images": images, "seconds": round(seconds, 3), "images_per_s": round(images / seconds, 4)}, model


def run_baseline(model: Any, stream: list[dict[str, Any]]) -> dict[str, Any]:
    """One diffusers pipeline call per job (the hand-written worker), same model and device."""
    import torch
    from PIL import Image

    def call(request: dict[str, Any]) -> None:
        generators = [torch.Generator("cpu").manual_seed(request["seed"] + i) for i in range(request["num_images"])]
        common = dict(prompt=request["prompt"], negative_prompt=request["negative_prompt"],
                      num_images_per_prompt=request["num_images"], num_inference_steps=request["num_inference_steps"],
                      guidance_scale=request["guidance_scale"], generator=generators, output_type="pil")
        if "image" in request:
            model.img2img(**common, image=Image.open(io.BytesIO(request["image"])).convert("RGB"),
                          strength=request["strength"])
        else:
            model.txt2img(**common, width=request["width"], height=request["height"])

    sync = torch.cuda.synchronize if model.device.startswith("cuda") else (lambda: None)
    for shape in {(r["width"], r["height"], "image" in r): r for r in stream}.values():  # warm-up per shape
        call({**shape, "num_images": 1})
    sync()
    started = time.perf_counter()
    for request in stream:
        call(request)
    sync()
    seconds = time.perf_counter() - started
    images = sum(r["num_images"] for r in stream)
    return {"images": images, "seconds": round(seconds, 3), "images_per_s": round(images / seconds, 4)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny (CPU) or sd21-arch (GPU), or a diffusers folder")
    parser.add_argument("--scenario", default="mixed", choices=["mixed", "uniform", "both"])
    parser.add_argument("--jobs", type=int, help="jobs per scenario (default: 40 on the CPU, 32 on a GPU)")
    parser.add_argument("--broker-url", default=os.environ.get("SDQUEUE_BROKER_URL", "redis://127.0.0.1:6379/14"))
    parser.add_argument("--workdir", type=Path, help="scratch directory (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="where the JSON results go")
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args()

    import torch

    on_gpu = torch.cuda.is_available()
    profile = PROFILES["gpu" if on_gpu else "cpu"]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="sdqueue-bench-"))
    data_dir = Path(os.environ.get("SDQUEUE_DATA_DIR", workdir))
    env = {
        "SDQUEUE_BROKER_URL": args.broker_url,
        "SDQUEUE_DATABASE_URL": os.environ.get("SDQUEUE_DATABASE_URL", f"sqlite:///{workdir / 'bench.db'}"),
        "SDQUEUE_STORAGE_URL": os.environ.get("SDQUEUE_STORAGE_URL", (workdir / "storage").as_uri()),
        "SDQUEUE_MODEL": args.model,
        "SDQUEUE_DATA_DIR": str(data_dir),
        "SDQUEUE_QUEUE": f"bench-{uuid.uuid4().hex[:8]}",
        "HF_HUB_OFFLINE": "1",
    }
    os.environ.update(env)
    settings = load_settings()
    upgrade(settings.database_url)
    spec = resolve_model(args.model, data_dir)
    if spec.random_weights and not (spec.local_dir and (spec.local_dir / "model_index.json").is_file()):
        from worker.build import build_and_save

        print(f"building {spec.name} into {built_models_dir(data_dir) / spec.name} ...", flush=True)
        build_and_save(spec.name, built_models_dir(data_dir) / spec.name)

    results: dict[str, Any] = {"machine": machine(), "model": args.model, "device": "cuda" if on_gpu else "cpu",
                               "dtype": "float16" if on_gpu else "float32", "scenarios": {}}
    scenarios = ["mixed", "uniform"] if args.scenario == "both" else [args.scenario]
    model = None
    for scenario in scenarios:
        stream = make_stream(scenario, profile, args.jobs or profile["jobs"])
        print(f"[{scenario}] {len(stream)} jobs, {sum(r['num_images'] for r in stream)} images: worker ...", flush=True)
        e2e = run_worker_stream(env, stream, workdir, args.timeout)
        print(f"[{scenario}] direct batch function on the {e2e['batches']} recorded batches ...", flush=True)
        direct, model = run_direct(settings, e2e.pop("batch_ids"))
        print(f"[{scenario}] baseline, one diffusers call per job ...", flush=True)
        baseline = run_baseline(model, stream)
        figures = {
            "end_to_end": e2e, "direct_batch_function": direct, "baseline_one_call_per_job": baseline,
            "speedup_vs_baseline": round(e2e["images_per_s"] / baseline["images_per_s"], 3),
            "end_to_end_vs_direct": round(e2e["images_per_s"] / direct["images_per_s"], 3),
        }
        results["scenarios"][scenario] = figures
        print(json.dumps({scenario: figures}, indent=1), flush=True)
        del model
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"stream-{results['device']}-{args.model}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    (args.out / name).write_text(json.dumps(results, indent=1))
    print(f"results: {args.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
