"""The dependency direction: producer never loads torch or the worker; worker never imports producer."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

HEAVY = ("torch", "diffusers", "transformers", "compel", "worker")


def loaded_after(code: str) -> list[str]:
    probe = code + (
        "\nimport sys\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return eval(result.stdout.strip().splitlines()[-1])  # a printed list of names


def test_importing_producer_loads_no_torch_and_no_worker():
    modules = ("producer, producer.client, producer.cli, producer.demo, producer.publish, producer.runs.manifest, "
               "producer.runs.enqueue, producer.runs.status, producer.runs.export, producer.runs.schedules, "
               "models.tables, models.db")
    assert loaded_after(f"import {modules}") == []


def test_cli_submit_path_loads_no_torch(settings, tmp_path):
    # the real submit, through the CLI's main, against Redis, PostgreSQL and S3
    code = (
        "from producer.cli import main\n"
        "assert main(['submit', '--prompt', 'a cat', '--width', '256', '--height', '256', '--seed', '1']) == 0\n"
    )
    assert loaded_after(code) == []


def imported_packages(package: str) -> dict[Path, set[str]]:
    """The top-level packages each module of `package` imports (at any depth of its code)."""
    found = {}
    for path in (ROOT / package).rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        found[path] = names
    return found


def test_worker_never_imports_producer():
    for path, names in imported_packages("worker").items():
        assert "producer" not in names, path


def test_models_stays_torch_free():
    for path, names in imported_packages("models").items():
        assert not names & {"torch", "diffusers", "transformers", "compel", "worker", "producer"}, (path, names)
