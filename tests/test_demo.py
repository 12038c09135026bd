"""`sdqueue demo` as the README runs it: no services, no hub, so it says so and uses tiny."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_demo_without_weights_says_so_then_runs_on_tiny(tmp_path):
    # no deployment's settings; torch's threads pinned as for every test (a loaded machine, two pytest processes)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDQUEUE_") or k == "SDQUEUE_TORCH_THREADS"}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    result = subprocess.run([sys.executable, "-m", "producer.cli", "demo", "--dir", str(tmp_path / "demo")],
                            capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "the weights of sd21 (stabilityai/stable-diffusion-2-1) cannot be reached" in out
    assert "running on the TINY model instead" in out
    rows = [line for line in out.splitlines() if " succeeded " in line]
    assert len(rows) == 6 and sum(" img2img " in row for row in rows) == 1
    pngs = sorted(Path(tmp_path / "demo" / "storage" / "images").rglob("*.png"))
    assert len(pngs) == 7  # one job has num_images=2
    assert all(str(p) in out for p in pngs)
