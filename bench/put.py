"""One PUT of an image to S3, as a worker makes one per image: the client's own CPU, boto3's
`put_object` against `S3Storage.put` (MinIO's client, models/storage.py), on a SeaweedFS of its own.

    .venv/bin/python bench/put.py                  # 5 rounds of 500 PUTs of 60 KB each way, interleaved
    .venv/bin/python bench/put.py --count 100 --rounds 2

Writes bench/results/put-cpu-DATE.txt. Only this process's CPU is counted (the server's is not).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from fleet import BUCKET, machine, spread  # noqa: E402

from models.storage import S3Storage  # noqa: E402
from tests.servers import S3_ACCESS_KEY, S3_SECRET_KEY, SeaweedServer, s3_client  # noqa: E402


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=500, help="PUTs a round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", type=int, default=60_000, help="bytes an object (a stand-in 512x512 PNG: ~60 KB)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    head = f"# python bench/put.py {' '.join(argv if argv is not None else sys.argv[1:])}: {machine()}, {time.strftime('%Y-%m-%d %H:%M')}"
    print(head, flush=True)
    os.environ.update(AWS_ACCESS_KEY_ID=S3_ACCESS_KEY, AWS_SECRET_ACCESS_KEY=S3_SECRET_KEY)
    data = os.urandom(args.size)
    with tempfile.TemporaryDirectory(prefix="sdqueue-put-") as tmp, SeaweedServer(Path(tmp)) as s3:
        s3_client(s3.endpoint).create_bucket(Bucket=BUCKET)
        storage = S3Storage(BUCKET, "put", endpoint_url=s3.endpoint)
        ways = {
            "boto3 put_object": lambda key: storage.client.put_object(Bucket=BUCKET, Key=f"put/{key}", Body=data,
                                                                      ContentType="image/png"),
            "S3Storage.put (MinIO's client)": lambda key: storage.put(key, data, "image/png"),
        }
        figures: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in ways}
        for name, put in ways.items():  # connections made, imports done
            for i in range(20):
                put(f"warm/{name[:5]}/{i}")
        for number in range(args.rounds):  # interleaved: the machine's noise falls on both
            for name, put in ways.items():
                spent, started = cpu(), time.perf_counter()
                for i in range(args.count):
                    put(f"{number}/{name[:5]}/{i}.png")
                figures[name][0].append(1000 * (cpu() - spent) / args.count)
                figures[name][1].append(1000 * (time.perf_counter() - started) / args.count)
    lines = [head, f"{args.rounds} rounds of {args.count} PUTs of {args.size:,} bytes, median [min-max]", ""]
    lines += [f"{name:32} CPU {spread(cpu_ms, 2)} ms, wall {spread(wall_ms, 2)} ms"
              for name, (cpu_ms, wall_ms) in figures.items()]
    print("\n".join(lines[1:]))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"put-cpu-{time.strftime('%Y%m%d-%H%M%S')}.txt").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
