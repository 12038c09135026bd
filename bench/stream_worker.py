"""The end-to-end side of bench/stream.py: a real `sdqueue worker` process per batching mode, a
stream of jobs submitted to it at planned arrival times, and the figures read from the database.

Each mode's worker gets its own queue, and (unless SDQUEUE_DATABASE_URL / SDQUEUE_STORAGE_URL say
otherwise) its own SQLite file, storage folder and spool, so the two workers never see each
other's jobs. Both stay up for the whole benchmark: one model load each, and a warm-up per shape
before anything is timed.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from models.db import upgrade
from models.errors import JobTimeout
from models.settings import load_settings
from models.tables import Batch, Image, Job

# Seconds between a job's end and the next idle-latency job: the worker finishes its bookkeeping.
IDLE_PAUSE = 0.2
# Denoising steps of a warm-up job: enough to run every kernel of its shape once.
WARM_STEPS = 2


def starter_png(size: int) -> bytes:
    from PIL import Image as PILImage, ImageDraw

    img = PILImage.new("RGB", (size, size), (40, 70, 140))
    ImageDraw.Draw(img).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=(250, 210, 60))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def warm_up_requests(shapes: set[tuple[int, int, bool]]) -> list[dict[str, Any]]:
    requests = []
    for width, height, img2img in sorted(shapes):
        request: dict[str, Any] = {"prompt": "warm-up", "width": width, "height": height,
                                   "num_inference_steps": WARM_STEPS, "seed": 0}
        if img2img:
            request.update(image=starter_png(width), strength=1.0)
        requests.append(request)
    return requests


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


class WorkerProcess:
    """`sdqueue worker` with SDQUEUE_BATCHING=`mode`, and a client on its queue."""

    def __init__(self, mode: str, env: dict[str, str], workdir: Path):
        from producer.client import Client

        self.mode = mode
        own = workdir / mode
        own.mkdir(parents=True, exist_ok=True)
        self.env = {
            **env,
            "SDQUEUE_BATCHING": mode,
            "SDQUEUE_QUEUE": f"bench-{mode}-{uuid.uuid4().hex[:8]}",
            "SDQUEUE_DATABASE_URL": os.environ.get("SDQUEUE_DATABASE_URL") or f"sqlite:///{own / 'bench.db'}",
            "SDQUEUE_STORAGE_URL": os.environ.get("SDQUEUE_STORAGE_URL") or (own / "storage").as_uri(),
            "SDQUEUE_SPOOL_DIR": str(own / "spool"),
        }
        self.settings = load_settings(
            queue=self.env["SDQUEUE_QUEUE"], database_url=self.env["SDQUEUE_DATABASE_URL"],
            storage_url=self.env["SDQUEUE_STORAGE_URL"], spool_dir=self.env["SDQUEUE_SPOOL_DIR"], batching=mode,
        )
        upgrade(self.settings.database_url)
        self.log_path = own / f"worker-{uuid.uuid4().hex[:6]}.log"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "producer.cli", "worker", "--loglevel", "WARNING"],
            stdout=open(self.log_path, "wb"), stderr=subprocess.STDOUT, env={**os.environ, **self.env},
            start_new_session=True,
        )
        self.client = Client(self.settings)

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def wait_all(self, job_ids: list[str], timeout: float) -> list[dict[str, Any]]:
        """Every job's record once it has ended; raises if one failed or the worker died."""
        deadline = time.monotonic() + timeout
        records = []
        for job_id in job_ids:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"{self.mode} worker exited ({self.process.returncode}); "
                                       f"log:\n{self.log_tail()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.mode} worker: jobs not done after {timeout:g} s; "
                                       f"log:\n{self.log_tail()}")
                try:
                    record = self.client.wait(job_id, timeout=5)
                    break
                except JobTimeout:
                    continue
            if record["state"] != "succeeded":
                raise RuntimeError(f"{self.mode} worker: job {job_id} {record['state']}: {record['error']}\n"
                                   f"log:\n{self.log_tail()}")
            records.append(record)
        return records

    def warm_up(self, shapes: set[tuple[int, int, bool]], timeout: float) -> None:
        """A short job per (width, height, img2img): first-call costs stay out of the figures."""
        self.wait_all([self.client.submit(r) for r in warm_up_requests(shapes)], timeout)

    def serve(self, stream: list[dict[str, Any]], offsets: list[float], timeout: float) -> dict[str, Any]:
        """Submit `stream`, request i at `offsets[i]` seconds after the first, wait for every job;
        figures from the rows: wall from the first job's creation to the last one's end."""
        job_ids = []
        start = time.perf_counter()
        for request, at in zip(stream, offsets):
            delay = start + at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            job_ids.append(self.client.submit(request))
        self.wait_all(job_ids, timeout)
        return self.figures(job_ids)

    def figures(self, job_ids: list[str]) -> dict[str, Any]:
        with self.client.db.session() as session:
            rows = session.query(Job).filter(Job.id.in_(job_ids)).all()
            first = min(j.created_at for j in rows)
            wall = (max(j.finished_at for j in rows) - first).total_seconds()
            latencies = [(j.finished_at - j.created_at).total_seconds() for j in rows]
            images = session.query(Image).filter(Image.job_id.in_(job_ids)).all()
            batch_ids = {i.batch_id for i in images if i.batch_id}
            batches = session.query(Batch).filter(Batch.id.in_(batch_ids)).order_by(Batch.started_at).all()
            batch_list = [(b.id, b.size, b.jobs, b.peak_memory_bytes) for b in batches]
            shared = [(i.shared_mean, i.shared_max) for i in images if i.shared_mean is not None]
        peaks = [b[3] for b in batch_list if b[3]]
        figures: dict[str, Any] = {
            "jobs": len(rows), "images": len(images), "wall_s": round(wall, 3),
            "images_per_s": round(len(images) / wall, 4), "jobs_per_s": round(len(rows) / wall, 4),
            "latency_p50_s": round(percentile(latencies, 0.5), 3),
            "latency_p95_s": round(percentile(latencies, 0.95), 3),
            "gpu_peak_memory_GB": round(max(peaks) / 1e9, 2) if peaks else None,
            "job_ids": job_ids, "batch_ids": [b[0] for b in batch_list],
        }
        if shared:  # continuous: samples per model call, as each image saw them
            figures["samples_per_call_mean"] = round(sum(m for m, _ in shared) / len(shared), 2)
            figures["samples_per_call_max"] = max(m for _, m in shared)
        else:  # window: batches as they ran
            figures.update(
                batches=len(batch_list),
                batch_size_histogram=dict(sorted(Counter(b[1] for b in batch_list).items())),
                jobs_per_batch_histogram=dict(sorted(Counter(b[2] for b in batch_list).items())))
        return figures

    def idle_latency(self, request: dict[str, Any], count: int, timeout: float) -> list[float]:
        """Submit->succeeded of `count` jobs, each submitted alone on an idle worker."""
        latencies = []
        for i in range(count):
            job_id = self.client.submit({**request, "seed": request["seed"] + i})
            self.wait_all([job_id], timeout)
            latencies.append(self.figures([job_id])["wall_s"])
            time.sleep(IDLE_PAUSE)
        return latencies

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, 15)  # warm shutdown: finish the batch in hand, exit
            try:
                self.process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait()
        self.client.close()
