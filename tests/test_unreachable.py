"""Services that cannot be reached: one clear line, and no job left waiting for a lost message."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from models.errors import ServiceUnavailable
from tests.conftest import BUCKET
from tests.servers import free_port, s3_client


def test_unreachable_broker_takes_the_submit_back(settings, png_bytes):
    from sqlalchemy import func, select

    from models.settings import load_settings
    from models.tables import Job
    from producer.client import Client

    client = Client(load_settings(broker_url=f"redis://127.0.0.1:{free_port()}/0"))
    try:
        with client.db.session() as session:
            before = session.scalar(select(func.count()).select_from(Job))
        for request in ({"prompt": "a cat", "width": 256, "height": 256},
                        {"prompt": "a cat", "width": 256, "height": 256, "image": png_bytes()}):
            with pytest.raises(ServiceUnavailable, match="cannot be reached.*: nothing was enqueued$"):
                client.submit(request)
        with client.db.session() as session:
            assert session.scalar(select(func.count()).select_from(Job)) == before  # nothing half-written
        prefix = settings.storage_url.removeprefix(f"s3://{BUCKET}/")
        listed = s3_client(settings.s3_endpoint_url).list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/inputs/")
        assert listed.get("KeyCount", 0) == 0  # the img2img input was taken back too
    finally:
        client.close()


def test_unreachable_broker_is_one_line_from_the_cli(settings_env):
    env = {**os.environ, "SDQUEUE_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"}
    result = subprocess.run([sys.executable, "-m", "producer.cli", "submit", "--prompt", "a cat"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("sdqueue: error: broker redis://127.0.0.1:") and "nothing was enqueued" in result.stderr


def test_unreachable_database_is_one_line(settings_env):
    env = {**os.environ, "SDQUEUE_DATABASE_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/x"}
    result = subprocess.run([sys.executable, "-m", "producer.cli", "submit", "--prompt", "a cat"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("sdqueue: error: database postgresql+psycopg://postgres@127.0.0.1:")
    assert "cannot be reached" in result.stderr
