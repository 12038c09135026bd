"""Benchmark: how fast `sdqueue run` enqueues a manifest into Redis + PostgreSQL (and SQLite).

For each row count (10,000 and 100,000 by default) and each database, writes a JSONL manifest of
varied prompts and sizes, then times what `sdqueue run MANIFEST --name NAME` does, through the
same functions: reading and validating every row (load_manifest), then writing the rows in
batches and publishing their messages pipelined (enqueue_run). Each case runs `--repeat` times
into a fresh run; the figures are jobs/s of the enqueue alone and of the whole command, with the
spread. A second enqueue of the same manifest into the same run (nothing missing) is timed too.

    python bench/enqueue.py                       # Redis on 127.0.0.1:6379/13, PostgreSQL's `test` database
    python bench/enqueue.py --rows 10000 --repeat 5 --databases postgresql

Needs Redis and PostgreSQL (trust auth); makes and drops a database of its own. Writes the
figures, with the machine's name, to bench/results/enqueue-cpu-DATE.txt.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.constants import queue_for  # noqa: E402
from models.db import upgrade  # noqa: E402
from models.settings import load_settings  # noqa: E402
from producer.client import Client  # noqa: E402
from producer.runs.enqueue import enqueue_run  # noqa: E402
from producer.runs.manifest import load_manifest  # noqa: E402

SIZES = [(512, 512), (768, 768), (768, 512), (512, 768)]


def write_manifest(path: Path, rows: int) -> None:
    with open(path, "w") as f:
        for i in range(rows):
            width, height = SIZES[i % len(SIZES)]
            f.write(json.dumps({"prompt": f"a watercolour of lighthouse number {i} at dusk", "width": width,
                                "height": height, "num_inference_steps": 20 + i % 11, "seed": i}) + "\n")


def postgres_database(admin_url: str) -> tuple[str, Callable[[], None]]:
    import psycopg

    name = f"sdqueue_bench_{uuid.uuid4().hex[:8]}"
    conninfo = admin_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return admin_url.rsplit("/", 1)[0] + "/" + name, drop


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:,.0f}"
    return f"{statistics.median(values):,.0f} (min {min(values):,.0f}, max {max(values):,.0f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--databases", nargs="+", default=["postgresql", "sqlite"], choices=["postgresql", "sqlite"])
    parser.add_argument("--broker-url", default=os.environ.get("SDQUEUE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/13"))
    parser.add_argument("--postgres-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    import redis

    broker = redis.Redis.from_url(args.broker_url)
    lines = [f"# sdqueue bench/enqueue.py on {platform.node()} ({os.cpu_count()} CPUs, {platform.machine()}), "
             f"{time.strftime('%Y-%m-%d %H:%M:%S')}",
             "# jobs/s: median (min, max) of --repeat runs, each into a fresh run; 'enqueue' is writing rows and "
             "publishing; 'command' adds reading and validating the manifest"]
    print(lines[0])
    with tempfile.TemporaryDirectory(prefix="sdqueue-bench-") as scratch:
        for database in args.databases:
            if database == "postgresql":
                url, drop = postgres_database(args.postgres_url)
            else:
                url, drop = f"sqlite:///{scratch}/bench.db", (lambda: None)
            upgrade(url)
            client = Client(load_settings(database_url=url, broker_url=args.broker_url, queue="sdqueue-bench",
                                          data_dir=Path(scratch)))
            try:
                for rows in args.rows:
                    manifest_path = Path(scratch) / f"manifest-{rows}.jsonl"
                    write_manifest(manifest_path, rows)
                    enqueue_rates, command_rates, totals, resumes = [], [], [], []
                    for attempt in range(args.repeat):
                        broker.flushdb()
                        started = time.perf_counter()
                        manifest = load_manifest(manifest_path)
                        assert not manifest.rejects and len(manifest.rows) == rows
                        name = f"bench-{rows}-{attempt}-{uuid.uuid4().hex[:6]}"
                        report = enqueue_run(client, name, manifest, progress=False)
                        total = time.perf_counter() - started
                        assert report is not None and report.inserted == rows
                        per_message = client.settings.jobs_per_message  # bulk jobs to a message
                        bulk = queue_for(client.settings.queue, "bulk", client.settings.default_model)
                        assert broker.llen(bulk) == -(-rows // per_message)
                        again = time.perf_counter()
                        second = enqueue_run(client, name, load_manifest(manifest_path), progress=False)
                        assert second is not None and second.inserted == 0 and second.sent == 0
                        resumes.append(time.perf_counter() - again)
                        enqueue_rates.append(report.rate)
                        command_rates.append(rows / total)
                        totals.append(total)
                    line = (f"{database:10} {rows:>7} rows: enqueue {spread(enqueue_rates)} jobs/s; command "
                            f"{spread(command_rates)} jobs/s, {statistics.median(totals):.1f} s in all; "
                            f"same manifest again (nothing missing) {statistics.median(resumes):.1f} s")
                    print(line, flush=True)
                    lines.append(line)
            finally:
                client.close()
                drop()
    broker.flushdb()
    write_results(args.out, "enqueue", lines)
    return 0


def write_results(folder: Path, name: str, lines: list[str]) -> Path:
    """The figures as bench/results/NAME-cpu-DATE.txt."""
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{name}-cpu-{time.strftime('%Y%m%d')}.txt"
    out.write_text("\n".join(lines) + "\n")
    print(f"written to {out}")
    return out


if __name__ == "__main__":
    sys.exit(main())
