#!/usr/bin/env bash
# The browser tests/test_dashboard.py drives: Debian's `chromium`, which Playwright launches as it
# is (`playwright install` would download browsers from the internet, which CI cannot reach).
# Installed through apt where it is missing (about 125 MB, 15 s from a Debian mirror), with
# fonts-liberation so that pages render their text alike on every machine.
set -eu

command -v chromium >/dev/null && exit 0

as_root=()
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || { echo "chromium is missing: install it as root (apt-get install chromium)"; exit 1; }
  as_root=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get -o DPkg::Lock::Timeout=300 update -qq
"${as_root[@]}" apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends chromium fonts-liberation
command -v chromium >/dev/null
