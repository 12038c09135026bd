"""`sdqueue export`'s memory over a large run, without running the run (issue 16, part 4).

bench/million.py --to-end takes a million jobs through stand-in workers (over an hour here) before
it exports them. This makes the same run's rows directly instead, so the export alone can be
watched at any size in minutes. One command starts its own Redis, PostgreSQL and SeaweedFS (as
bench/fleet.py does) and:

1. enqueues a manifest of N one-image rows with `sdqueue run` (no worker is started);
2. marks every job succeeded by its first claim, with one image row each, in SQL (what a worker's
   record writes: key images/JOB/1/0.png, one batch), and puts one real 256x256 PNG under every
   key in S3 (the same bytes: the export checks each against its row's sha256);
3. runs `sdqueue export` of the run in each --format, one after the other, and prints its peak RSS
   (its VmHWM, read by bench/million.py's `reap`) and, at each tenth of its time, its RSS and the
   Python heap's live blocks, which the export process reports each second. A bounded export's RSS
   stops growing early; a leak grows with the rows.

    .venv/bin/python bench/export.py --rows 300000                     # both formats: ~20 minutes here
    .venv/bin/python bench/export.py --rows 1000000                    # a million: ~70 minutes here
    .venv/bin/python bench/export.py --rows 20000 --format parquet     # a smoke test
    .venv/bin/python bench/export.py --env MALLOC_ARENA_MAX=2          # the export under an environment

Writes the table to bench/results/export-cpu-DATE.txt.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from fleet import BUCKET, standin_env  # noqa: E402
from million import Results, reap, write_manifest  # noqa: E402

from tests.servers import PostgresServer, RedisServer, SeaweedServer, s3_client  # noqa: E402

SIZE = 256
PREFIX = "export"


def png() -> bytes:
    """A real PNG of the stand-in's pattern with a record like a worker's in its text chunks (about
    the size of the stand-in's 256x256 images in bench/million.py's run)."""
    from PIL import Image

    from worker.encode import encode_png
    from worker.standin import pattern

    record = {"prompt": "a photograph of a bench, row 0", "negative_prompt": "", "seed": 1, "index": 0,
              "mode": "txt2img", "width": SIZE, "height": SIZE, "num_inference_steps": 25, "guidance_scale": 7.5,
              "model": "standin", "model_source": "standin", "model_revision": None, "scheduler": "standin",
              "scheduler_config": {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear"},
              "versions": {"sdqueue": "bench"}, "pixel_sha256": "0" * 64}
    return encode_png(Image.fromarray(pattern(1, SIZE, SIZE)), record)


def succeed_all(database_url: str, data: bytes) -> int:
    """Every job of the database succeeded by claim 1, with its one image row: what the worker's
    record writes, in four statements."""
    from sqlalchemy import text

    from models.db import Database

    sha = hashlib.sha256(data).hexdigest()
    db = Database(database_url)
    try:
        with db.engine.begin() as conn:
            conn.execute(text(
                "INSERT INTO batches (id, worker, model, scheduler, device, dtype, size, versions, started_at) "
                "VALUES ('bench-export', 'bench', 'standin', 'standin', 'cpu', 'uint8', 8, '{}', now())"))
            rows = conn.execute(text(
                "UPDATE jobs SET state = 'succeeded', attempts = 1, lease_token = 1, worker = 'bench', "
                "started_at = now(), finished_at = now(), updated_at = now()")).rowcount
            conn.execute(text(
                "INSERT INTO images (job_id, index, seed, object_key, sha256, size_bytes, width, height, batch_id, "
                "steps_run, shared_max, shared_mean, created_at) "
                "SELECT id, 0, seed, 'images/' || id || '/1/0.png', :sha, :size, width, height, 'bench-export', "
                "num_inference_steps, 8, 8.0, now() FROM jobs"), {"sha": sha, "size": len(data)})
            conn.execute(text("ANALYZE jobs; ANALYZE images"))
        return rows
    finally:
        db.dispose()


def put_all(database_url: str, env: dict[str, str], data: bytes, threads: int = 8) -> None:
    """The PNG under every image row's key, through the workers' own storage code."""
    from sqlalchemy import text

    from models.db import Database
    from models.storage import open_storage

    db = Database(database_url)
    try:
        with db.engine.connect() as conn:
            keys = conn.execute(text("SELECT object_key FROM images")).scalars().all()
    finally:
        db.dispose()
    os.environ.update({name: env[name] for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")})
    storage = open_storage(env["SDQUEUE_STORAGE_URL"], endpoint_url=env["SDQUEUE_S3_ENDPOINT_URL"])
    with ThreadPoolExecutor(threads) as pool:
        for start in range(0, len(keys), 10_000):  # map submits all it is given at once: a slice at a time
            for _ in pool.map(lambda key: storage.put(key, data, "image/png"), keys[start : start + 10_000]):
                pass


# The export runs as `sdqueue export` does, in a process that also writes, each second, its RSS and
# the Python heap's live blocks (sys.getallocatedblocks): RSS growing while the blocks stay flat is
# memory outside Python's objects (a C library, or the allocator's fragmentation).
WATCHED = """
import sys, threading, time
def watch(path):
    with open(path, "w") as out:
        while True:
            with open("/proc/self/status") as f:
                rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
            out.write(f"{time.monotonic()} {rss} {sys.getallocatedblocks()}\\n")
            out.flush()
            time.sleep(1.0)
threading.Thread(target=watch, args=(sys.argv[1],), daemon=True).start()
from producer.cli import main
sys.exit(main(sys.argv[2:]))
"""


def export(env: dict[str, str], dest: Path, form: str, rows: int, watch: Path) -> list[str]:
    """One `sdqueue export`: its time, CPU and peak RSS, and by tenths of its time (the export runs
    at a steady pace: a tenth of the time is about a tenth of the rows) the RSS and the Python
    heap's live blocks at the end of each."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", WATCHED, str(watch), "export", "bench", str(dest), "--format", form],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage, peak = next(reap([proc.pid]))
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        error = proc.stderr.read().decode(errors="replace")[-2000:] if proc.stderr else ""
        return [f"`sdqueue export --format {form}` FAILED: {error}"]
    samples = [tuple(float(x) for x in line.split()) for line in watch.read_text().splitlines() if line.count(" ") == 2]
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    rss, blocks = [], []
    if samples:
        first, last = samples[0][0], samples[-1][0]
        for tenth in range(1, 11):
            at = [s for s in samples if s[0] <= first + (last - first) * tenth / 10][-1]
            rss.append(f"{at[1] / 1024:.0f}")
            blocks.append(f"{at[2] / 1e3:.0f}")
    return [f"`sdqueue export --format {form}`: {seconds:.0f} s ({rows / seconds:,.0f} images/s), "
            f"{usage.ru_utime + usage.ru_stime:.0f} s of CPU, peak RSS {peak / 1024:.0f} MiB, "
            f"{size / 2**20:,.0f} MiB written",
            f"  at the end of each tenth of its time: RSS (MiB) {' '.join(rss)}",
            f"  Python heap's live blocks (thousands)    {' '.join(blocks)}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--format", action="append", choices=["parquet", "webdataset", "imagefolder", "hf"],
                        help="formats to export, one after the other (default: parquet and webdataset)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="set in the export's environment (repeat for more)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    forms = args.format or ["parquet", "webdataset"]
    results = Results("export.py", argv)
    say = results.say

    with tempfile.TemporaryDirectory(prefix="sdqueue-export-") as tmp:
        workdir = Path(tmp)
        manifest = workdir / "rows.jsonl"
        write_manifest(manifest, args.rows, SIZE)
        with RedisServer(workdir / "redis") as redis, PostgresServer(workdir / "postgres") as pg, \
                SeaweedServer(workdir / "s3") as s3:
            s3_client(s3.endpoint).create_bucket(Bucket=BUCKET)
            database_url = pg.create_database("export")
            from models.db import upgrade

            upgrade(database_url)
            env = {**standin_env(redis.url, database_url, s3.endpoint, PREFIX, workdir, 0.0),
                   "SDQUEUE_QUEUE": "export"}
            cli = [sys.executable, "-m", "producer.cli"]
            started = time.perf_counter()
            subprocess.run([*cli, "run", str(manifest), "--name", "bench"], cwd=ROOT, env=env, check=True,
                           stdout=subprocess.DEVNULL)
            data = png()
            made = succeed_all(database_url, data)
            put_all(database_url, env, data)
            say(f"{made:,} succeeded jobs of one {SIZE}x{SIZE} image made in {time.perf_counter() - started:.0f} s "
                f"(enqueued, marked in SQL, {len(data):,}-byte PNG put under each key)")
            env.update(dict(item.split("=", 1) for item in args.env))
            if args.env:
                say(f"export environment: {' '.join(args.env)}")
            for form in forms:
                dest = workdir / f"export-{form}"
                for line in export(env, dest, form, made, workdir / f"watch-{form}.txt"):
                    say(line)
                subprocess.run(["rm", "-rf", str(dest)], check=True)
    print(f"written to {results.write(args.out, 'export')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
