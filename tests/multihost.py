"""Worker hosts on one machine: a network partition, and throughput from one host to three.

    sudo .venv/bin/python -m tests.multihost                  # 300 jobs on 3 hosts; one host's link cut mid-batch
    sudo .venv/bin/python -m tests.multihost --scaling        # first images/s on 1 host vs 3, repeated

Each worker "host" is a network namespace of its own (`ip netns`) joined to a bridge by a veth
pair, with its own address on a private /24, its own hostname (a UTS namespace, so its leases name
it), its own data dir and spool, and one `sdqueue worker`. Redis, PostgreSQL and SeaweedFS
(tests/servers.py) listen on the bridge's address in this namespace; the hosts have no route but
their /24, so nothing else is reached, and the servers are not on loopback for the hosts to use.

The partition: once a quarter of the jobs succeeded and the host holds running jobs, its veth is
set down (no RST, no FIN: its connections simply go silent), with a claim of the host's in flight:
made, not committed (a worker's own claims are caught so only by chance). Its leases expire, the
sweepers of the other hosts give its jobs back, and they run there; the claim in flight holds its
row locked until PostgreSQL drops the silent connection (models/db.py: about 30 s), and its job
then runs elsewhere too. When every job has ended the link comes back: the cut worker finds it
lost its jobs and must record nothing of them (every write checks the lease), then serves again.
The audit is the fault suite's (tests/faults.py): every job succeeded, once; one image per index
from one claim; objects and rows agree, sha256 and all.

Needs root and `ip netns`; the bridge, veths and namespaces carry a random tag and are removed at
the end, and the leftovers of a run that was killed are removed by the next one.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from sqlalchemy import select

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models import jobs  # noqa: E402
from models.tables import Job  # noqa: E402
from models.workers import WorkerRegistry  # noqa: E402
from tests.faults import RECORDED, Config, Report, Suite  # noqa: E402

# Which runs made which bridges and namespaces: a file per run, named by its tag, holding its pid.
STATE_DIR = Path("/run/sdqueue-multihost")
PROMPTS = ["a red fox", "a quiet harbour", "a lighthouse at dusk", "a tree in the snow", "a cat on a wall"]


# --- the network ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Host:
    name: str  # its hostname, the first part of its workers' names (HOST:PID:RANDOM)
    netns: str
    veth: str  # our end of its link, on the bridge: down is the partition
    address: str


def unavailable() -> str | None:
    """Why worker hosts in network namespaces cannot be made here; None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root (run as root or with sudo)"
    for tool in ("ip", "unshare", "sh"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    probe = f"sdq-probe-{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` fails here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True)
    return None


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


class Network:
    """A bridge in this namespace with `hosts` namespaces on it, on a /24 no route here uses."""

    def __init__(self, hosts: int):
        self.tag = uuid.uuid4().hex[:4]
        self.bridge = f"sdq-{self.tag}-br"  # interface names: 15 characters at most
        self.subnet = free_subnet()
        addresses = list(self.subnet.hosts())
        self.gateway = str(addresses[0])  # the bridge's address: where the servers listen
        self.hosts = [Host(f"sdq-host{i}", f"sdq-{self.tag}-h{i}", f"sdq-{self.tag}-v{i}", str(addresses[9 + i]))
                      for i in range(1, hosts + 1)]
        self.state = STATE_DIR / self.tag

    def create(self) -> None:
        remove_leftovers()
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        self.state.write_text(json.dumps({"pid": os.getpid(), "bridge": self.bridge, "gateway": self.gateway,
                                          "veths": [h.veth for h in self.hosts], "netns": [h.netns for h in self.hosts]}))
        prefix = self.subnet.prefixlen
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.gateway}/{prefix}", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        for host in self.hosts:
            ip("netns", "add", host.netns)
            ip("link", "add", host.veth, "type", "veth", "peer", "name", "eth0", "netns", host.netns)
            ip("link", "set", host.veth, "master", self.bridge, "up")
            ip("-n", host.netns, "addr", "add", f"{host.address}/{prefix}", "dev", "eth0")
            ip("-n", host.netns, "link", "set", "eth0", "up")
            ip("-n", host.netns, "link", "set", "lo", "up")

    def destroy(self) -> None:
        remove_network(self.bridge, [h.veth for h in self.hosts], [h.netns for h in self.hosts])
        self.state.unlink(missing_ok=True)

    def cut(self, host: Host) -> None:
        ip("link", "set", host.veth, "down")

    def restore(self, host: Host) -> None:
        ip("link", "set", host.veth, "up")

    def command(self, host: Host, argv: list[str]) -> list[str]:
        """`argv` run on `host`: in its network namespace, under its hostname. Each step execs the
        next, so the process started is `argv`'s own (signals reach it)."""
        return ["ip", "netns", "exec", host.netns, "unshare", "--uts", "--",
                "sh", "-c", 'hostname "$0" && exec "$@"', host.name, *argv]

    def __enter__(self) -> Network:
        try:
            self.create()
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()


def free_subnet() -> ipaddress.IPv4Network:
    """A random 10.x.y.0/24 that overlaps no address or route of this machine."""
    used = []
    for args in (("-4", "-o", "addr", "show"), ("-4", "route", "show", "table", "all")):
        for word in ip(*args).stdout.split():
            try:
                used.append(ipaddress.ip_network(word, strict=False))
            except ValueError:
                pass
    rng = random.Random()
    for _ in range(1000):
        subnet = ipaddress.IPv4Network(f"10.{rng.randrange(64, 250)}.{rng.randrange(1, 250)}.0/24")
        if not any(subnet.overlaps(other) for other in used if other.version == 4 and other.prefixlen > 0):
            return subnet
    raise RuntimeError("no free 10.x.y.0/24 found")


def remove_network(bridge: str, veths: list[str], namespaces: list[str]) -> None:
    """Kill what still runs in the namespaces, delete them, their veths and the bridge. (A namespace
    outlives its deletion while a socket of its own lingers, and its veth pair with it: so the veths
    are deleted by name.)"""
    for netns in namespaces:
        pids = ip("netns", "pids", netns, check=False).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        ip("netns", "delete", netns, check=False)
    for name in [*veths, bridge]:
        ip("link", "delete", name, check=False)


def stop_listeners(address: str) -> None:
    """SIGTERM to the processes listening on `address` (a dead run's servers), where `ss` is installed."""
    if shutil.which("ss") is None:
        return
    listing = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True).stdout
    for line in listing.splitlines():
        fields = line.split()
        if len(fields) > 5 and fields[3].rsplit(":", 1)[0] == address:
            for pid in re.findall(r"pid=(\d+)", fields[5]):
                try:
                    os.kill(int(pid), signal.SIGTERM)
                except ProcessLookupError:
                    pass


def remove_leftovers() -> None:
    """The bridges and namespaces of earlier runs whose process is gone (killed, crashed)."""
    if not STATE_DIR.is_dir():
        return
    for state in STATE_DIR.iterdir():
        try:
            left = json.loads(state.read_text())
            os.kill(int(left["pid"]), 0)
            continue  # that run is alive: not ours to touch
        except ProcessLookupError:
            stop_listeners(left["gateway"])  # its servers
            remove_network(left["bridge"], left["veths"], left["netns"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        state.unlink(missing_ok=True)


# --- the workers ----------------------------------------------------------------------------------


class HostWorkers:
    """One `sdqueue worker` per host, started inside the host; restarted when it dies, as a
    supervisor would (each death counted). Hosts can be stopped and started again (scaling)."""

    def __init__(self, network: Network, env: dict[str, str], workdir: Path, hosts: list[Host]):
        self.network = network
        self.env = env
        self.workdir = workdir
        self.logdir = workdir / "logs"
        self.procs: dict[str, subprocess.Popen] = {}
        self.exit_codes: dict[str, list[int]] = {}
        self.deaths = 0
        self._lock = threading.Lock()
        self._stopping = False
        for host in hosts:
            self.start(host)
        self._thread = threading.Thread(target=self._supervise, daemon=True)
        self._thread.start()

    def host_env(self, host: Host) -> dict[str, str]:
        """A data dir and a spool of its own; the model is the one built once, linked in."""
        home = self.workdir / "hosts" / host.name
        (home / "data").mkdir(parents=True, exist_ok=True)
        models = home / "data" / "models"
        if not models.exists():
            models.symlink_to(Path(self.env["SDQUEUE_DATA_DIR"]) / "models")
        return {**self.env, "SDQUEUE_DATA_DIR": str(home / "data"), "SDQUEUE_SPOOL_DIR": str(home / "spool")}

    def start(self, host: Host) -> None:
        argv = [sys.executable, "-m", "producer.cli", "worker", "--loglevel", "INFO"]
        with open(self.log_path(host), "ab") as log, self._lock:
            self.procs[host.name] = subprocess.Popen(
                self.network.command(host, argv), cwd=ROOT, env=self.host_env(host), stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    def stop_host(self, host: Host) -> None:
        """SIGTERM, as an operator stops a worker (it gives back what it holds)."""
        with self._lock:
            proc = self.procs.pop(host.name)
        self._end({host.name: proc})

    def _end(self, procs: dict[str, subprocess.Popen], timeout: float = 120) -> None:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc in procs.items():
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            self.exit_codes.setdefault(name, []).append(proc.returncode)

    def _supervise(self) -> None:
        while not self._stopping:
            with self._lock:
                dead = [name for name, proc in self.procs.items() if proc.poll() is not None]
            for name in dead:
                host = next(h for h in self.network.hosts if h.name == name)
                with self._lock:
                    if self._stopping or name not in self.procs:
                        continue
                    self.exit_codes.setdefault(name, []).append(self.procs[name].returncode)
                    self.deaths += 1
                self.start(host)
            time.sleep(0.2)

    def running(self) -> list[str]:
        with self._lock:
            return list(self.procs)

    def alive(self, host: Host) -> bool:
        with self._lock:
            proc = self.procs.get(host.name)
        return proc is not None and proc.poll() is None

    def pids(self) -> list[int]:
        with self._lock:
            return [proc.pid for proc in self.procs.values()]

    def stop(self) -> None:
        self._stopping = True
        self._thread.join()
        with self._lock:
            procs, self.procs = self.procs, {}
        self._end(procs)

    def log_path(self, host: Host) -> Path:
        return self.logdir / f"worker-{host.name}.log"

    def log_of(self, host: Host) -> str:
        path = self.log_path(host)
        return path.read_text(errors="replace") if path.exists() else ""

    def logs(self) -> str:
        return "".join(self.log_of(host) for host in self.network.hosts)


# --- the run -------------------------------------------------------------------------------------


@dataclass
class HostConfig(Config):
    jobs: int = 300  # in the batch whose host is cut
    scaling_jobs: int = 0  # jobs per throughput measurement (0: none)
    repeats: int = 3  # of each measurement, 1 host and 3 taking turns to go first
    steps: int = 2
    size: int = 256
    # Short leases, so that a cut host's jobs run elsewhere within seconds (defaults: 30 s, 10 s, 60 s).
    settings: dict[str, str] = field(default_factory=lambda: {
        "SDQUEUE_LEASE_SECONDS": "6", "SDQUEUE_HEARTBEAT_SECONDS": "2", "SDQUEUE_SWEEP_INTERVAL": "2",
        "SDQUEUE_REQUEUE_AFTER": "10",
    })


@dataclass
class HostReport(Report):
    hosts: list[str] = field(default_factory=list)
    cut_host: str = ""
    done_at_cut: int = 0
    held_at_cut: dict[str, int] = field(default_factory=dict)  # job id: its claim (lease token) then
    in_flight: str = ""  # the job whose claim the host had made but not committed when its link went
    recorded_by_cut_host: list[str] = field(default_factory=list)  # of those: what the cut host still recorded
    charged_by_cut: int = 0  # of those: attempts charged (it ran alone, so its worker looked dead)
    jobs_by_host: dict[str, int] = field(default_factory=dict)
    cut_worker_alive: bool = False  # when the link came back
    served_after_restore: int = 0  # jobs the cut host recorded of the first wave it took after its link came back
    exit_codes: dict[str, list[int]] = field(default_factory=dict)
    images_per_s: dict[int, list[float]] = field(default_factory=dict)  # hosts: one figure per repeat

    @property
    def problems(self) -> list[str]:
        found = self.exactly_once_problems()
        if self.states["succeeded"] != self.submitted:
            found.append(f"not every job succeeded: {dict(self.states)} of {self.submitted}")
        if not self.held_at_cut:
            found.append(f"{self.cut_host} held no running job when its link was cut")
        if not self.in_flight:
            found.append(f"{self.cut_host} had no claim in flight when its link was cut")
        if self.recorded_by_cut_host:
            found.append(f"{self.cut_host} recorded jobs it had lost: {self.recorded_by_cut_host}")
        if self.worker_deaths:
            found.append(f"{self.worker_deaths} worker process(es) died")
        if not self.cut_worker_alive:
            found.append(f"the worker of {self.cut_host} was gone when its link came back")
        if not self.served_after_restore:
            found.append(f"{self.cut_host} recorded no job after its link came back")
        if any(code != 0 for codes in self.exit_codes.values() for code in codes):
            found.append(f"a worker exited with an error: {self.exit_codes}")
        return found

    def scaling_lines(self) -> list[str]:
        if not self.images_per_s:
            return []
        lines = ["throughput (images/s, from the first submit to the last success; median [min-max]):"]
        for hosts, rates in sorted(self.images_per_s.items()):
            lines.append(f"  {hosts} host(s)  {spread(rates)}   ({', '.join(f'{r:.2f}' for r in rates)})")
        if len(self.images_per_s) == 2:
            one, many = (self.images_per_s[k] for k in sorted(self.images_per_s))
            ratios = [b / a for a, b in zip(one, many)]
            lines.append(f"  ratio {max(self.images_per_s)}/{min(self.images_per_s)}    {spread(ratios)}   "
                         f"({', '.join(f'{r:.2f}' for r in ratios)}; each repeat's pair)")
        return lines

    def __str__(self) -> str:
        lines = [
            f"hosts                     {', '.join(self.hosts)} (the link of {self.cut_host} cut)",
            f"jobs submitted            {self.submitted}",
            f"  succeeded               {self.states['succeeded']}",
            f"  by host                 {', '.join(f'{h} {n}' for h, n in sorted(self.jobs_by_host.items()))}",
            f"at the cut                {self.done_at_cut} ended; {self.cut_host} held {len(self.held_at_cut)} running "
            f"and a claim in flight ({self.in_flight or 'none'})",
            f"  recorded by it later    {len(self.recorded_by_cut_host)}",
            f"  attempts charged        {self.charged_by_cut} (those running alone: to a sweeper it looked dead)",
            f"stuck (not ended)         {len(self.stuck)}",
            f"run to completion twice   {len(self.completed_twice)}",
            f"image sets not one claim  {len(self.image_sets_wrong)}",
            f"objects without a row     {len(self.unreferenced_objects)}",
            f"rows without an object    {len(self.missing_objects)}",
            f"sha256 mismatches         {len(self.sha_mismatches)}",
            f"cut worker                {'alive' if self.cut_worker_alive else 'gone'} when its link came back; "
            f"then recorded {self.served_after_restore} job(s) of a wave",
            f"worker exit codes         {self.exit_codes} (SIGTERM at the end); deaths {self.worker_deaths}",
            "recovery:",
            *(f"  {name:54} {seconds:6.1f} s" for name, seconds in self.recoveries.items()),
            *self.scaling_lines(),
            f"total                     {self.seconds:.0f} s",
            "RESULT: " + ("PASS" if not self.problems else "FAIL\n  " + "\n  ".join(self.problems)),
        ]
        return "\n".join(lines)


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]"


def requests(rng: random.Random, count: int, cfg: HostConfig) -> list[dict[str, Any]]:
    return [{"prompt": rng.choice(PROMPTS), "width": cfg.size, "height": cfg.size, "num_inference_steps": cfg.steps,
             "num_images": rng.choice([1, 1, 2]), "guidance_scale": rng.choice([1.0, 7.5]), "seed": rng.randrange(10**6)}
            for _ in range(count)]


class PartitionSuite(Suite):
    """The fault suite's servers, set-up and audit; hosts in namespaces, and one fault: a partition."""

    cfg: HostConfig
    report: HostReport
    workers: HostWorkers  # type: ignore[assignment]

    def __init__(self, cfg: HostConfig, workdir: Path, data_dir: Path | None, log: Callable[[str], None],
                 network: Network):
        super().__init__(cfg, workdir, data_dir, log, host=network.gateway)
        self.network = network
        self.report = HostReport(hosts=[h.name for h in network.hosts], cut_host=network.hosts[-1].name)

    def start_workers(self) -> HostWorkers:  # type: ignore[override]
        return HostWorkers(self.network, self.env, self.workdir, self.network.hosts)

    def submit(self, count: int) -> list[str]:
        ids = self.client.submit_many(requests(self.rng, count, self.cfg))
        self.job_ids += ids
        return ids

    def ended(self, ids: list[str]) -> Callable[[], bool]:
        return lambda: all(state not in ("queued", "running") for state, _ in self.state_of(ids).values())

    def held_by(self, host: Host) -> dict[str, int]:
        """Running jobs whose lease `host`'s worker holds: their claims."""
        with self.client.db.session() as session:
            found = session.scalars(select(Job).where(Job.state == "running", Job.lease_owner.startswith(f"{host.name}:")))
            return {job.id: job.lease_token for job in found}

    def faults(self) -> None:
        if self.cfg.scaling_jobs:
            self.scaling()
        self.partition()

    # --- one host's link cut mid-batch ----------------------------------------------------------------

    def partition(self) -> None:
        report, cut = self.report, self.network.hosts[-1]
        self.use_hosts(self.network.hosts)
        ids = self.submit(self.cfg.jobs)
        self.log(f"{len(ids)} jobs submitted to {len(self.network.hosts)} hosts")

        # 1. once a quarter has ended and the host holds running jobs, its link goes down
        #    with a claim in flight: made on the host, not committed when the link goes (the timing a
        #    worker's own claims hit only by chance), so the server holds its row lock
        self.wait("a quarter of the jobs ended and the host busy", lambda: (
            len(self.rows(Job.id.in_(ids), Job.state == "succeeded")) >= len(ids) // 4 and len(self.held_by(cut)) >= 2
        ), timeout=300, step=0.05)
        holder = self.claim_in_flight(cut, [job.id for job in self.rows(Job.id.in_(ids), Job.state == "queued")][::-1])
        try:
            self.network.cut(cut)
            cut_at = time.monotonic()
            report.held_at_cut = self.held_by(cut)
            report.done_at_cut = len(self.rows(Job.id.in_(ids), Job.state.notin_(("queued", "running"))))
            self.log(f"link of {cut.name} cut: it held {len(report.held_at_cut)} running job(s) and a claim in flight "
                     f"of job {report.in_flight}; {report.done_at_cut} of {len(ids)} ended")
            self.recover(cut, ids, cut_at)
        finally:
            holder.kill()
            holder.wait()

    def claim_in_flight(self, host: Host, candidates: list[str]) -> subprocess.Popen:
        """`hold_claim` running on `host`, once it holds the lock of one of `candidates` (queued jobs)."""
        log = self.workdir / "logs" / f"claim-in-flight-{host.name}.log"
        code = f"from tests.multihost import hold_claim; hold_claim({candidates[:500]!r})"  # the workers take the first ones while it starts
        with open(log, "ab") as out:
            holder = subprocess.Popen(self.network.command(host, [sys.executable, "-c", code]), cwd=ROOT,
                                      env=self.workers.host_env(host), stdout=out, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        try:
            self.wait("a claim in flight", lambda: "claimed " in log.read_text() or holder.poll() is not None, timeout=60)
            if holder.poll() is not None:
                raise RuntimeError(f"the claim in flight ended: {log.read_text()[-2000:]}")
        except BaseException:
            holder.kill()
            holder.wait()
            raise
        self.report.in_flight = log.read_text().split("claimed ", 1)[1].split()[0]
        return holder

    def recover(self, cut: Host, ids: list[str], cut_at: float) -> None:
        report = self.report

        # 2. its jobs run elsewhere once their leases expire, the claim in flight's once the server
        #    drops its connection; everything ends without it
        held = list(report.held_at_cut)

        def since_cut(name: str, predicate: Callable[[], bool], timeout: float) -> None:
            self.wait(name, predicate, timeout=timeout)
            report.recoveries[f"cut: {name}"] = time.monotonic() - cut_at

        since_cut("its jobs taken back from it", lambda: all(
            state != "running" or not (owner or "").startswith(f"{cut.name}:")
            for state, owner in self.state_of(held).values()), timeout=self.cfg.deadline)
        since_cut("its jobs succeeded elsewhere", lambda: all(
            state == "succeeded" for state, _ in self.state_of(held).values()), timeout=self.cfg.deadline)
        since_cut("the job of its claim in flight claimed elsewhere", lambda: (
            self.state_of([report.in_flight])[report.in_flight][0] != "queued"), timeout=self.cfg.deadline)
        since_cut("every job ended, without the cut host", self.ended(ids), timeout=self.cfg.deadline)
        self.log(", ".join(f"{name} after {seconds:.1f} s" for name, seconds in report.recoveries.items()))

        # 3. the link comes back: the cut worker finds its jobs gone, records none of them, serves again
        self.network.restore(cut)
        back = time.time()
        report.cut_worker_alive = self.workers.alive(cut)
        registry = WorkerRegistry(self.settings)

        def status(**wanted: Any) -> Callable[[], bool]:
            return lambda: any(w.get("host") == cut.name and float(w.get("updated_at", 0)) > back
                               and all(w.get(k) == v for k, v in wanted.items()) for w in registry.workers())

        try:
            self.wait("the cut worker publishing again", status(), timeout=self.cfg.deadline)
            report.recoveries["link back: the cut worker publishing again"] = time.time() - back
            self.wait("the cut worker holding nothing", status(held=0), timeout=self.cfg.deadline)
            report.recoveries["link back: the cut worker holding nothing"] = time.time() - back
        finally:
            registry.close()
        # small waves until the cut worker records a job of one (its broker connection may come back
        # later than the rest: TCP retries a silent connection less and less often)
        deadline = time.monotonic() + self.cfg.deadline
        while not report.served_after_restore and time.monotonic() < deadline:
            wave = self.submit(2 * len(self.network.hosts))
            self.wait("a wave after the link came back", self.ended(wave), timeout=self.cfg.deadline)
            report.served_after_restore = len(self.rows(Job.id.in_(wave), Job.worker.startswith(f"{cut.name}:")))
        report.recoveries["link back: the cut worker recording jobs again"] = time.time() - back
        report.cut_worker_alive = report.cut_worker_alive and self.workers.alive(cut)
        self.log(", ".join(f"{name} after {seconds:.1f} s" for name, seconds in report.recoveries.items()
                           if name.startswith("link back")))

    # --- throughput, 1 host and all of them ---------------------------------------------------------

    def use_hosts(self, hosts: list[Host]) -> None:
        """Exactly `hosts` run a worker, each ready; a few jobs first when one was started (warm-up)."""
        wanted = {h.name for h in hosts}
        for host in self.network.hosts:
            if host.name not in wanted and host.name in self.workers.running():
                self.workers.stop_host(host)
        starting = [h for h in hosts if h.name not in self.workers.running()]
        before = {h.name: self.workers.log_of(h).count(" ready.") for h in starting}
        for host in starting:
            self.workers.start(host)
        self.wait("workers ready", lambda: all(self.workers.log_of(h).count(" ready.") > before[h.name] for h in starting),
                  timeout=240)
        if starting:
            self.wait("warm-up jobs", self.ended(self.submit(4 * len(hosts))), timeout=300)

    def scaling(self) -> None:
        orders = [[len(self.network.hosts), 1], [1, len(self.network.hosts)]]
        for repeat in range(self.cfg.repeats):
            for count in orders[repeat % 2]:
                hosts = self.network.hosts[:count]
                self.use_hosts(hosts)
                rate = self.measure()
                self.report.images_per_s.setdefault(count, []).append(rate)
                self.log(f"repeat {repeat + 1}: {count} host(s) {rate:.2f} images/s")

    def measure(self) -> float:
        """Images/s of a batch submitted at once: from before its submit to its last success."""
        started = time.time()
        ids = self.submit(self.cfg.scaling_jobs)
        self.wait("the batch ended", self.ended(ids), timeout=self.cfg.deadline)
        done = self.rows(Job.id.in_(ids))
        images = sum(job.num_images for job in done if job.state == "succeeded")
        last = max(jobs.aware(job.finished_at) for job in done if job.finished_at is not None)
        return images / (last - datetime.fromtimestamp(started, timezone.utc)).total_seconds()

    # --- the audit --------------------------------------------------------------------------------

    def audit(self) -> None:
        super().audit()
        report, cut = self.report, self.network.hosts[-1]
        report.exit_codes = self.workers.exit_codes
        held = list(report.held_at_cut)
        with self.client.db.session() as session:
            finished = list(session.scalars(select(Job).where(Job.id.in_(self.job_ids))))
            charged = session.scalars(select(Job).where(Job.id.in_(held), Job.failures > 0)).all()
        report.charged_by_cut = len(charged)
        for job in finished:
            host = (job.worker or "?").split(":", 1)[0]
            report.jobs_by_host[host] = report.jobs_by_host.get(host, 0) + (job.state == "succeeded")
        # what the cut host recorded: by the rows (the claim that succeeded), and by its own log
        recorded = set(RECORDED.findall(self.workers.log_of(cut)))
        report.recorded_by_cut_host = sorted(
            {j.id for j in finished if j.id in report.held_at_cut and (j.worker or "").startswith(f"{cut.name}:")}
            | {job_id for job_id, claim in recorded if report.held_at_cut.get(job_id) == int(claim)})


def hold_claim(candidates: list[str]) -> None:
    """On a host about to be cut off: claim the first of `candidates` that can be claimed, as a
    worker does (models/jobs.py), and stop before the commit, as if the link died mid-claim."""
    from models.db import Database
    from models.settings import load_settings

    settings = load_settings()
    db = Database(settings.database_url)
    with db.session() as session:
        for job_id in candidates:
            job, _why = jobs.claim(session, job_id, f"{socket.gethostname()}:{os.getpid()}:in-flight", settings.model,
                                   lease_seconds=settings.lease_seconds, max_attempts=settings.max_attempts)
            if job is not None:
                session.flush()
                print(f"claimed {job_id}", flush=True)
                time.sleep(3600)
    raise SystemExit("none of the candidates could be claimed")


def run(cfg: HostConfig, workdir: Path, data_dir: Path | None = None,
        log: Callable[[str], None] = print) -> HostReport:
    """The whole run: network, servers, workers, the partition (and scaling), the audit; torn down after."""
    with Network(cfg.workers) as network:
        log(f"bridge {network.bridge} {network.gateway}/{network.subnet.prefixlen}; hosts "
            + ", ".join(f"{h.name} {h.address} ({h.netns})" for h in network.hosts))
        report = PartitionSuite(cfg, workdir, data_dir, log, network).run()
    assert isinstance(report, HostReport)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.multihost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=300, help="jobs in the batch whose host is cut [300]")
    parser.add_argument("--hosts", type=int, default=3, help="worker hosts [3]")
    parser.add_argument("--scaling", action="store_true", help="first, images/s with 1 host and with all, repeated")
    parser.add_argument("--scaling-jobs", type=int, default=120, help="jobs per throughput measurement [120]")
    parser.add_argument("--repeats", type=int, default=3, help="of each throughput measurement [3]")
    parser.add_argument("--dir", type=Path, help="keep servers' data and worker logs here (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results",
                        help="where the report goes, as multihost-cpu-DATE.txt [bench/results]")
    args = parser.parse_args(argv)
    why = unavailable()
    if why is not None:
        print(f"python -m tests.multihost: {why}", file=sys.stderr)
        return 2
    cfg = HostConfig(workers=args.hosts, jobs=args.jobs, scaling_jobs=args.scaling_jobs if args.scaling else 0,
                     repeats=args.repeats, deadline=900.0)
    workdir = args.dir or Path(tempfile.mkdtemp(prefix="sdqueue-multihost-"))
    workdir.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # tear the network down on the way out
    head = (f"# python -m tests.multihost {' '.join(argv if argv is not None else sys.argv[1:])}: {cfg.workers} hosts, "
            f"{cfg.jobs} jobs of {cfg.size}x{cfg.size} at {cfg.steps} steps, {cfg.model} model, 1 torch thread a worker, "
            f"{' '.join(f'{k}={v}' for k, v in cfg.settings.items())}; {platform.node()}, {os.cpu_count()} CPUs "
            f"(load average {os.getloadavg()[0]:.1f} at the start), {time.strftime('%Y-%m-%d')}")
    print(head)
    lines: list[str] = []

    def log(line: str) -> None:
        print(f"  {line}", flush=True)
        lines.append(f"  {line}")

    report = run(cfg, workdir, log=log)
    print(report)
    from bench.enqueue import write_results

    write_results(args.out, "multihost", [head, *lines, str(report)])
    return 0 if not report.problems else 1


if __name__ == "__main__":
    sys.exit(main())
