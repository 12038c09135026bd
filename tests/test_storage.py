"""Both storage backends behind one interface, against a folder and the real S3 server."""

from __future__ import annotations

import uuid

import pytest

from models.errors import StorageError
from models.storage import LocalStorage, input_key_for, object_key_for, open_storage
from tests.conftest import BUCKET


def test_object_keys_come_from_the_job_id():
    assert object_key_for("j1", 3, claim=2) == "images/j1/2/3.png"
    assert input_key_for("j1") == "inputs/j1/input"


@pytest.fixture(params=["file", "s3"])
def storage(request, tmp_path, s3_env):  # type: ignore[no-untyped-def]
    if request.param == "file":
        return open_storage((tmp_path / "objects").as_uri())
    return open_storage(f"s3://{BUCKET}/unit-{uuid.uuid4().hex[:8]}", endpoint_url=s3_env)


def test_put_get_exists_delete(storage):
    key = object_key_for("job", 0, 1)
    assert not storage.exists(key)
    storage.put(key, b"\x89PNG...", content_type="image/png")
    assert storage.exists(key) and storage.get(key) == b"\x89PNG..."
    storage.put(key, b"again")  # overwrite: a redelivered job writes the same key
    assert storage.get(key) == b"again"
    storage.delete(key)
    assert not storage.exists(key)
    with pytest.raises(StorageError, match="not found"):
        storage.get(key)


def test_locations(tmp_path, s3_env):
    local = open_storage(tmp_path.as_uri())
    assert local.location("images/a/0.png") == str(tmp_path / "images/a/0.png")
    s3 = open_storage(f"s3://{BUCKET}/pre/fix", endpoint_url=s3_env)
    assert s3.location("images/a/0.png") == f"s3://{BUCKET}/pre/fix/images/a/0.png"


def test_local_keys_cannot_leave_the_folder(tmp_path):
    with pytest.raises(StorageError, match="leaves the storage folder"):
        LocalStorage(tmp_path).put("../escape", b"x")


def test_s3_errors_are_storage_errors(s3_env, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    refused = open_storage(f"s3://{BUCKET}/denied", endpoint_url=s3_env)
    with pytest.raises(StorageError, match="upload of 'k' to s3://sdqueue-test/denied failed"):
        refused.put("k", b"x")
    with pytest.raises(StorageError, match="download of 'k' from s3://sdqueue-test/denied failed"):
        refused.get("k")


def test_an_s3_server_away_is_unavailable_and_a_refusal_is_not(s3_env, monkeypatch):
    from models.errors import StorageUnavailable
    from tests.servers import free_port

    away = open_storage(f"s3://{BUCKET}/away", endpoint_url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(StorageUnavailable, match="upload of 'k' to s3://sdqueue-test/away: the S3 server cannot be reached"):
        away.put("k", b"x")
    with pytest.raises(StorageUnavailable, match="download of 'k' from s3://sdqueue-test/away: the S3 server cannot be reached"):
        away.get("k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    with pytest.raises(StorageError) as refused:
        open_storage(f"s3://{BUCKET}/denied", endpoint_url=s3_env).put("k", b"x")
    assert not isinstance(refused.value, StorageUnavailable)  # a refusal, not an outage

