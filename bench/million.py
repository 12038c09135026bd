"""A million-row run: how long its enqueue takes, and how the read paths answer at that size while
stand-in workers run it (issue 16, part 4).

One command starts its own Redis, PostgreSQL and SeaweedFS (as bench/fleet.py does), writes a
manifest of N one-image 512x512 rows, and:

1. times `sdqueue run` of the whole manifest (wall clock, CPU, peak RSS), the workers not started;
2. starts W `sdqueue worker --model standin` processes and `sdqueue api` (auth off, loopback), and
   while the workers run the jobs, times each read a user makes of the run, R times:
   - `sdqueue runs show NAME --json`, the CLI as a user runs it (its process start included), on
     the database and through the API (SDQUEUE_API_URL),
   - GET /v1/runs/NAME,
   - GET /v1/jobs?run=NAME: the first page, then the page after --deep pages of 200 (following
     next_cursor),
   - the dashboard's run page, GET /runs/NAME;
3. stops everything after --run-seconds and says how far the run got; or, with --to-end, waits for
   the run's end and then:
4. audits it: every job succeeded, claimed once, with one image per index from its claim; as many
   objects in S3 as image rows, the same keys, and the sha256 of a sample of objects equal to their rows';
5. exports it (`sdqueue export`) to WebDataset shards and to Parquet, the two side by side, each
   timed with its peak RSS, and deletes them.

With --to-end, every --every seconds of the run (600) it also times `runs show` (on the database and through
the API) and the dashboard's run page once each.

    .venv/bin/python bench/million.py                        # 1,000,000 rows: about 10 minutes here
    .venv/bin/python bench/million.py --rows 20000 --repeats 2 --run-seconds 20   # a smoke test
    .venv/bin/python bench/million.py --to-end --workers 4 --size 256   # the whole run: hours here

Writes the table to bench/results/million-cpu-DATE.txt. Without --to-end the run is not taken to its
end: at the fleet benchmark's 90-150 jobs/s a million jobs take this machine hours.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from fleet import BUCKET, answers, machine, spread, standin_env, stop, wait  # noqa: E402

from tests.servers import PostgresServer, RedisServer, SeaweedServer, free_port, s3_client  # noqa: E402


class Results:
    """A benchmark's lines, printed as they come and written to bench/results at the end, under a
    head naming the command, the machine and the time."""

    def __init__(self, script: str, argv: list[str] | None):
        self.head = (f"# python bench/{script} {' '.join(argv if argv is not None else sys.argv[1:])}: {machine()}, "
                     f"{time.strftime('%Y-%m-%d %H:%M')}")
        self.lines: list[str] = []
        print(self.head, flush=True)

    def say(self, line: str) -> None:
        print(line, flush=True)
        self.lines.append(line)

    def write(self, out: Path, name: str) -> Path:
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{name}-cpu-{time.strftime('%Y%m%d-%H%M%S')}.txt"
        path.write_text("\n".join([self.head, *self.lines]) + "\n")
        return path


def high_water(pid: int) -> int:
    """A running process's peak RSS since its exec, in KiB (VmHWM; 0 once it has exited). wait4's
    ru_maxrss is no use for a child: Linux counts into it the RSS of the image it was forked from,
    the benchmark's own, as it stood at the exec (bench/export.py once gave 2,125 MiB for an export
    whose RSS never passed 200 MiB, read each second)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("VmHWM:")), 0)
    except OSError:
        return 0


def reap(pids: list[int]) -> Iterator[tuple[int, int, Any, int]]:
    """(pid, wait status, rusage, peak RSS in KiB) of each process as it ends, its VmHWM read each
    second while it runs (so a peak in its last second is missed)."""
    peaks = dict.fromkeys(pids, 0)
    while peaks:
        for pid in peaks:
            peaks[pid] = max(peaks[pid], high_water(pid))
        pid, status, usage = os.wait4(-1, os.WNOHANG)
        if not pid:
            time.sleep(1.0)
        elif pid in peaks:
            yield pid, status, usage, peaks.pop(pid)


def write_manifest(path: Path, rows: int, size: int) -> None:
    with open(path, "w") as f:
        for i in range(rows):
            f.write(json.dumps({"key": f"row-{i}", "prompt": f"a lighthouse at dusk, study {i % 997}",
                                "width": size, "height": size, "num_inference_steps": 25, "seed": i}) + "\n")


def timed(action: Callable[[], Any], repeats: int) -> list[float]:
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        seconds.append(time.perf_counter() - started)
    return seconds


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=120) as response:
        return response.read()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--deep", type=int, default=50, help="pages of 200 to follow before timing a deep page")
    parser.add_argument("--run-seconds", type=float, default=60.0, help="how long the workers run before it stops")
    parser.add_argument("--size", type=int, default=512, help="width and height of every row's image")
    parser.add_argument("--scale", type=float, default=0.0,
                        help="SDQUEUE_STANDIN_SCALE of the workers (0: no GPU time, they take every core they can; "
                             "1: an H100's time, they mostly wait)")
    parser.add_argument("--to-end", action="store_true", help="run every job, then audit and export the run")
    parser.add_argument("--every", type=float, default=600.0, help="with --to-end, seconds between progress lines")
    parser.add_argument("--sample", type=int, default=2000, help="objects whose sha256 the audit checks")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    results = Results("million.py", argv)
    say = results.say

    with tempfile.TemporaryDirectory(prefix="sdqueue-million-") as tmp:
        workdir = Path(tmp)
        manifest = workdir / "million.jsonl"
        write_manifest(manifest, args.rows, args.size)
        with RedisServer(workdir / "redis") as redis, PostgresServer(workdir / "postgres") as pg, \
                SeaweedServer(workdir / "s3") as s3:
            s3_client(s3.endpoint).create_bucket(Bucket=BUCKET)
            database_url = pg.create_database("million")
            from models.db import upgrade

            upgrade(database_url)
            port = free_port()
            env = {**standin_env(redis.url, database_url, s3.endpoint, "million", workdir, args.scale),
                   "SDQUEUE_QUEUE": "million", "SDQUEUE_API_AUTH": "off"}
            cli = [sys.executable, "-m", "producer.cli"]

            # 1. the enqueue, alone
            started = time.perf_counter()
            enqueue = subprocess.Popen([*cli, "run", str(manifest), "--name", "million"], cwd=ROOT, env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            _, status, usage, peak = next(reap([enqueue.pid]))
            seconds = time.perf_counter() - started
            if os.waitstatus_to_exitcode(status) != 0:
                raise RuntimeError(f"sdqueue run failed: {enqueue.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
            say(f"{args.rows:,} rows, `sdqueue run`: {seconds:.1f} s ({args.rows / seconds:,.0f} rows/s), "
                f"{usage.ru_utime + usage.ru_stime:.1f} s of CPU, peak RSS {peak / 1024:.0f} MiB")

            # 2. workers and the API; the reads, while they run
            procs = [subprocess.Popen([*cli, "worker", "--loglevel", "WARNING"], cwd=ROOT,
                                      env={**env, "SDQUEUE_METRICS_PORT": str(free_port())},
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
                     for _ in range(args.workers)]
            procs.append(subprocess.Popen([*cli, "api", "--host", "127.0.0.1", "--port", str(port)], cwd=ROOT,
                                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                          start_new_session=True))
            base = f"http://127.0.0.1:{port}"
            try:
                wait(lambda: answers(f"{base}/healthz"), "the API", 120)
                running_from = time.monotonic()

                followed = [0]

                def deep_page() -> None:
                    cursor = None
                    for followed[0] in range(1, args.deep + 2):  # up to the deep page, or the run's last
                        page = json.loads(get(f"{base}/v1/jobs?run=million&limit=200" + (f"&cursor={cursor}" if cursor else "")))
                        cursor = page["next_cursor"]
                        if cursor is None:
                            return

                reads = {
                    "sdqueue runs show --json (CLI)": lambda: subprocess.run([*cli, "runs", "show", "million", "--json"],
                                                                            cwd=ROOT, env=env, check=True,
                                                                            capture_output=True),
                    "sdqueue runs show --json (remote CLI)": lambda: subprocess.run(
                        [*cli, "runs", "show", "million", "--json"], cwd=ROOT, env={**env, "SDQUEUE_API_URL": base},
                        check=True, capture_output=True),
                    "GET /v1/runs/million": lambda: get(f"{base}/v1/runs/million"),
                    "GET /v1/jobs?run=million, first page": lambda: get(f"{base}/v1/jobs?run=million&limit=200"),
                    "dashboard /runs/million": lambda: get(f"{base}/runs/million"),
                }
                for label, action in reads.items():
                    say(f"{label:44} {spread(timed(action, args.repeats), 3)} s")
                pages = timed(deep_page, 1)[0] / followed[0]
                say(f"{'GET /v1/jobs?run=million, pages 1-' + str(followed[0]):44} {pages:.3f} s a page (mean)")
                if args.to_end:
                    probes = {label: reads[label] for label in (
                        "sdqueue runs show --json (CLI)", "sdqueue runs show --json (remote CLI)",
                        "dashboard /runs/million")}
                    to_end(base, running_from, probes, args.every, say)
                else:
                    time.sleep(max(0.0, args.run_seconds - (time.monotonic() - running_from)))
                run = json.loads(get(f"{base}/v1/runs/million"))
                say(f"after {time.monotonic() - running_from:.0f} s of {args.workers} stand-in workers: {run['jobs']}")
            finally:
                stop(procs)
            if args.to_end:
                for line in audit(database_url, s3.endpoint, env, args.sample):
                    say(line)
                for line in exports(cli, env, workdir, ("webdataset", "parquet")):
                    say(line)
    results.write(args.out, "million")
    return 0


def to_end(base: str, since: float, probes: dict[str, Callable[[], Any]], every: float,
           say: Callable[[str], None]) -> None:
    """Wait for the run's end (no job queued or running); every `every` seconds say how far it got and
    time each probe once, while the workers run."""
    said = time.monotonic()
    while True:
        counts = json.loads(get(f"{base}/v1/runs/million"))["jobs"]
        if not counts.get("queued") and not counts.get("running"):
            return
        if time.monotonic() - said > every:
            said = time.monotonic()
            done = sum(n for state, n in counts.items() if state not in ("queued", "running", "total"))
            timings = ", ".join(f"{label} {timed(action, 1)[0]:.2f} s" for label, action in probes.items())
            say(f"  {time.monotonic() - since:6.0f} s: {done:,} jobs ended ({done / (time.monotonic() - since):.0f}/s); "
                f"{timings}")
        time.sleep(5)


def audit(database_url: str, s3_endpoint: str, env: dict[str, str], sample: int) -> list[str]:
    """The run's audit, in bounded memory but for the set of its object keys."""
    from sqlalchemy import text

    from models.db import Database

    db = Database(database_url)
    s3 = s3_client(s3_endpoint)
    prefix = env["SDQUEUE_STORAGE_URL"].removeprefix(f"s3://{BUCKET}/") + "/"
    started = time.perf_counter()
    try:
        with db.engine.connect() as conn:
            states = dict(conn.execute(text("SELECT state, count(*) FROM jobs GROUP BY state")).all())
            attempts = dict(conn.execute(text("SELECT attempts, count(*) FROM jobs GROUP BY attempts")).all())
            wrong = conn.scalar(text(
                "SELECT count(*) FROM jobs j WHERE j.num_images <> (SELECT count(*) FROM images i WHERE i.job_id = j.id "
                "AND i.object_key LIKE 'images/' || j.id || '/' || j.lease_token || '/%')"))
            uploads = conn.scalar(text("SELECT count(*) FROM uploads"))
            keys = set(conn.execute(text("SELECT object_key FROM images")).scalars())
            picked = conn.execute(text("SELECT object_key, sha256 FROM images ORDER BY random() LIMIT :n"),
                                  {"n": sample}).all()
    finally:
        db.dispose()
    listed = 0
    strays = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for item in page.get("Contents", []):
            listed += 1
            if item["Key"].removeprefix(prefix) in keys:
                keys.discard(item["Key"].removeprefix(prefix))
            else:
                strays += 1
    mismatched = sum(1 for key, sha in picked if hashlib.sha256(
        s3.get_object(Bucket=BUCKET, Key=prefix + key)["Body"].read()).hexdigest() != sha)
    problems = [f"{what}: {n:,}" for what, n in (
        ("jobs without one image per index from their claim", wrong), ("upload rows left", uploads),
        ("objects without a row", strays), ("rows without their object", len(keys)),
        (f"objects of {len(picked):,} sampled whose sha256 is not their row's", mismatched)) if n]
    return [f"audit ({time.perf_counter() - started:.0f} s): states {states}, attempts {attempts}, "
            f"{listed:,} objects; " + ("; ".join(problems) or "every job succeeded once, objects and rows agree")]


def exports(cli: list[str], env: dict[str, str], workdir: Path, forms: tuple[str, ...]) -> list[str]:
    """`sdqueue export` of the whole run in each form, the exports side by side (one process each), each
    timed with its peak RSS; each export's files are deleted after."""
    started = time.perf_counter()
    procs = {}
    for form in forms:
        log = open(workdir / f"export-{form}.log", "wb")
        procs[subprocess.Popen([*cli, "export", "million", str(workdir / f"export-{form}"), "--format", form],
                               cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log).pid] = (form, log)
    lines = []
    for pid, status, usage, peak in reap(list(procs)):
        seconds = time.perf_counter() - started
        form, log = procs.pop(pid)
        log.close()
        if os.waitstatus_to_exitcode(status) != 0:
            error = (workdir / f"export-{form}.log").read_text(errors="replace")[-2000:]
            lines.append(f"`sdqueue export --format {form}` FAILED: {error}")
            continue
        dest = workdir / f"export-{form}"
        size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
        shutil.rmtree(dest)
        lines.append(f"`sdqueue export --format {form}` ({len(forms)} side by side): {seconds:.0f} s, "
                     f"{usage.ru_utime + usage.ru_stime:.0f} s of CPU, peak RSS {peak / 1024:.0f} MiB, "
                     f"{size / 2**20:,.0f} MiB written")
    return lines


if __name__ == "__main__":
    sys.exit(main())
