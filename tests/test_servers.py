"""The restartable servers of the fault suite: real processes, stopped, killed and started again."""

from __future__ import annotations

import socket
from contextlib import closing
from pathlib import Path

import botocore.exceptions
import psycopg
import pytest
import redis

from tests.servers import PostgresServer, RedisServer, SeaweedServer, s3_client


def test_redis_restart_comes_back_empty_on_the_same_url(tmp_path: Path) -> None:
    with RedisServer(tmp_path) as server:
        url = server.url
        client = redis.Redis.from_url(url, socket_connect_timeout=1)
        try:
            client.set("job", "queued")
            server.restart()
            assert server.url == url and server.running
            assert client.get("job") is None  # no persistence: the broker lost everything
            server.kill()
            assert not server.running
            with pytest.raises(redis.ConnectionError):
                client.ping()
            server.start()
            assert client.ping()
        finally:
            client.close()
    assert not server.running


def test_a_server_that_cannot_start_says_why(tmp_path: Path) -> None:
    with closing(socket.socket()) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = RedisServer(tmp_path, port=taken.getsockname()[1])
        with pytest.raises(RuntimeError, match="redis exited"):
            server.start(timeout=10)
    assert not server.running


def test_postgres_keeps_its_data_across_stop_and_kill(tmp_path: Path) -> None:
    with PostgresServer(tmp_path) as server:
        url = server.create_database("faults")
        assert url == server.url.rsplit("/", 1)[0] + "/faults"
        conninfo = server.conninfo("faults")
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute("CREATE TABLE jobs (id text PRIMARY KEY)")
            conn.execute("INSERT INTO jobs VALUES ('j1')")

        server.stop()
        assert not server.running
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(conninfo, connect_timeout=2)
        server.start()
        with psycopg.connect(conninfo) as conn:
            assert conn.execute("SELECT id FROM jobs").fetchall() == [("j1",)]

        # A crash with a session open: its backend must not outlive the postmaster and block the start.
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute("INSERT INTO jobs VALUES ('j2')")
            server.kill()
            with pytest.raises(psycopg.OperationalError):
                conn.execute("SELECT 1")
        server.start()
        with psycopg.connect(conninfo) as conn:
            assert conn.execute("SELECT id FROM jobs ORDER BY id").fetchall() == [("j1",), ("j2",)]
    assert not server.cluster_dir.exists() or server.cluster_dir == tmp_path


def test_seaweed_objects_survive_a_stop_and_the_outage_is_a_connection_error(tmp_path: Path) -> None:
    with SeaweedServer(tmp_path) as server:
        endpoint = server.endpoint
        client = s3_client(endpoint)
        try:
            client.create_bucket(Bucket="faults")
            client.put_object(Bucket="faults", Key="images/j1/0.png", Body=b"png")

            server.stop()
            with pytest.raises(botocore.exceptions.EndpointConnectionError):
                client.get_object(Bucket="faults", Key="images/j1/0.png")
            server.start()
            assert server.endpoint == endpoint
            assert client.get_object(Bucket="faults", Key="images/j1/0.png")["Body"].read() == b"png"
        finally:
            client.close()
