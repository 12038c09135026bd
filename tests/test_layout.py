"""The dependency direction: producer never loads torch or the worker; worker never imports producer."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

HEAVY = ("torch", "diffusers", "transformers", "compel", "worker")
# What reading a job does not use: sending (Celery, kombu), migrating (Alembic), the object store (boto3).
NOT_FOR_READS = ("celery", "kombu", "alembic", "boto3", "botocore", "torch")


def loaded_after(code: str, packages: tuple[str, ...] = HEAVY) -> list[str]:
    probe = code + (
        "\nimport sys\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {packages!r}))\n"
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


def test_cli_status_and_wait_load_only_what_reading_a_job_needs(settings, client):
    # `sdqueue status` and `sdqueue wait` start fast: the real commands, through the CLI's main,
    # against Redis, PostgreSQL and S3, import no Celery, Alembic or boto3
    job_id = client.submit({"prompt": "a cat", "width": 256, "height": 256})
    code = (
        "from producer.cli import main\n"
        f"assert main(['status', {job_id!r}]) == 0\n"
        f"assert main(['status', {job_id!r}, '--json']) == 0\n"
        f"assert main(['wait', {job_id!r}, '--timeout', '0.2']) == 4\n"  # still queued: no worker here
    )
    assert loaded_after(code, NOT_FOR_READS) == []
    client.cancel(job_id)
    code = f"from producer.cli import main\nassert main(['wait', {job_id!r}, '--progress']) == 1\n"  # cancelled
    assert loaded_after(code, NOT_FOR_READS) == []


def test_schema_head_read_without_alembic_is_alembics_head():
    from alembic.script import ScriptDirectory

    from models import db

    assert db.head_revision() == ScriptDirectory.from_config(db.alembic_config("sqlite://")).get_current_head()


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
