"""Benchmark: how fast `sdqueue api` takes submissions. POST /v1/jobs of a small txt2img request,
from N concurrent clients (threads, each with its own keep-alive httpx connection) for --seconds;
the figures are accepted submissions/s and the p50/p99 latency of each POST. No worker is needed:
the jobs stay queued, and go with the bench's database and queue when it ends.

    python bench/api.py                                   # starts its own `sdqueue api`, see below
    python bench/api.py --clients 1 4 16 --seconds 10
    python bench/api.py --url http://host:8000 --token sdq_...   # a running API

Without --url it starts `sdqueue api` (one uvicorn process, auth on, a key without limits) on a
free port, against a fresh PostgreSQL database it makes and drops, Redis database 13 with a queue
of its own (deleted afterwards), and a local storage folder. The clients share the machine with
the server: on a small machine they take CPU from it, so the figures are a floor.
Writes the figures, with the machine's name, to bench/results/api-cpu-DATE.txt.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import closing
from pathlib import Path
from typing import Callable

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.enqueue import postgres_database, write_results  # noqa: E402

REQUEST = {"prompt": "a watercolour of a lighthouse at dusk", "width": 512, "height": 512,
           "num_inference_steps": 20}


def free_port() -> int:
    with closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_api(args: argparse.Namespace, scratch: str) -> tuple[str, str, Callable[[], None]]:
    """`sdqueue api` on a fresh database; (its URL, a token, what stops and cleans up)."""
    from models.db import Database, upgrade
    from producer.api.keys import create_key

    database_url, drop = postgres_database(args.postgres_url)
    upgrade(database_url)
    db = Database(database_url)
    token = create_key(db, "bench").token
    db.dispose()
    queue = f"sdqueue-bench-api-{uuid.uuid4().hex[:6]}"
    port = free_port()
    env = {**os.environ, "SDQUEUE_DATABASE_URL": database_url, "SDQUEUE_BROKER_URL": args.broker_url,
           "SDQUEUE_QUEUE": queue, "SDQUEUE_STORAGE_URL": Path(scratch, "storage").as_uri(),
           "SDQUEUE_DATA_DIR": scratch, "SDQUEUE_API_AUTH": "on"}
    server = subprocess.Popen([sys.executable, "-m", "producer.cli", "api", "--port", str(port), "--workers",
                               str(args.workers), "--loglevel", "warning"], env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or server.poll() is not None:
            server.kill()
            drop()
            raise SystemExit("sdqueue api did not become ready")
        time.sleep(0.2)

    def stop() -> None:
        import redis

        server.terminate()
        server.wait(timeout=30)
        broker = redis.Redis.from_url(args.broker_url)
        broker.delete(*broker.keys(f"{queue}.*"), f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}")
        broker.close()
        drop()

    return url, token, stop


def load(url: str, token: str, clients: int, seconds: float) -> tuple[int, int, list[float], float]:
    """(accepted, refused, latencies in s, elapsed s) of `clients` threads POSTing for `seconds`."""
    latencies: list[float] = []
    counts = {"accepted": 0, "refused": 0}
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)
    stop_at: list[float] = []

    def client() -> None:
        mine: list[float] = []
        accepted = refused = 0
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as http:
            http.get("/healthz")  # the connection, before the clock
            start.wait()
            while time.perf_counter() < stop_at[0]:
                began = time.perf_counter()
                answer = http.post("/v1/jobs", json=REQUEST)
                mine.append(time.perf_counter() - began)
                if answer.status_code == 201:
                    accepted += 1
                else:
                    refused += 1
        with lock:
            latencies.extend(mine)
            counts["accepted"] += accepted
            counts["refused"] += refused

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    began = time.perf_counter()
    stop_at.append(began + seconds)
    start.wait()
    for thread in threads:
        thread.join()
    return counts["accepted"], counts["refused"], latencies, time.perf_counter() - began


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running API (default: start one)")
    parser.add_argument("--token", help="with --url: a key's token (none with SDQUEUE_API_AUTH=off)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8], help="concurrent clients, one run each")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each run (default 10)")
    parser.add_argument("--workers", type=int, default=1, help="without --url: uvicorn processes (default 1)")
    parser.add_argument("--broker-url", default=os.environ.get("SDQUEUE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/13"))
    parser.add_argument("--postgres-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    lines = [f"# sdqueue bench/api.py on {platform.node()} ({os.cpu_count()} CPUs, {platform.machine()}), "
             f"{time.strftime('%Y-%m-%d %H:%M:%S')}",
             f"# POST /v1/jobs ({REQUEST['width']}x{REQUEST['height']} txt2img, JSON), {args.seconds:g} s per run; "
             + ("against " + args.url if args.url else
                f"against `sdqueue api --workers {args.workers}` started here (auth on, PostgreSQL, Redis, "
                "local storage), clients on the same machine")]
    print("\n".join(lines), flush=True)
    with tempfile.TemporaryDirectory(prefix="sdqueue-bench-api-") as scratch:
        if args.url:
            url, token, stop = args.url, args.token or "", (lambda: None)
        else:
            url, token, stop = start_api(args, scratch)
        try:
            load(url, token, 1, 1.0)  # warm: the first submit makes the app's client and connections
            for clients in args.clients:
                accepted, refused, latencies, elapsed = load(url, token, clients, args.seconds)
                line = (f"{clients:>3} clients: {accepted / elapsed:,.0f} submissions/s ({accepted} in "
                        f"{elapsed:.1f} s, {refused} refused); latency p50 {percentile(latencies, 0.5) * 1000:.1f} ms, "
                        f"p99 {percentile(latencies, 0.99) * 1000:.1f} ms, "
                        f"mean {statistics.fmean(latencies) * 1000:.1f} ms")
                print(line, flush=True)
                lines.append(line)
        finally:
            stop()
    write_results(args.out, "api", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
