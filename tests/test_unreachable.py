"""Services that cannot be reached: one clear line, and no job left waiting for a lost message."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from models.errors import ServiceUnavailable
from tests.servers import free_port


def test_unreachable_broker_fails_the_recorded_job(settings):
    from models.settings import load_settings
    from producer.client import Client

    client = Client(load_settings(broker_url=f"redis://127.0.0.1:{free_port()}/0"))
    with pytest.raises(ServiceUnavailable, match="cannot be reached.*was not enqueued and is recorded as failed"):
        client.submit({"prompt": "a cat", "width": 256, "height": 256})
    with client.db.session() as session:
        from sqlalchemy import select

        from models.tables import Job

        job = session.scalars(select(Job).order_by(Job.created_at.desc())).first()
        assert job.state == "failed" and job.error.startswith("could not be enqueued")
    client.close()


def test_unreachable_database_is_one_line(settings_env):
    env = {**os.environ, "SDQUEUE_DATABASE_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/x"}
    result = subprocess.run([sys.executable, "-m", "producer.cli", "submit", "--prompt", "a cat"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("sdqueue: error: database postgresql+psycopg://postgres@127.0.0.1:")
    assert "cannot be reached" in result.stderr
