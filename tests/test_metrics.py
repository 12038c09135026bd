"""Prometheus metrics: the API's /metrics (jobs by state and priority, queue depth, webhook
deliveries, its requests) against the real PostgreSQL and Redis; a real worker's metrics port
scraped over HTTP after a few jobs; and the Grafana dashboard naming only metrics that exist."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import small, wait_for
from tests.servers import free_port
from tests.test_api import bearer, make_key, serving  # noqa: F401  (make_key: a fixture)

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 120

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
def settings(settings_env: dict[str, str], monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """conftest's, with a metrics port of this test's own for the worker."""
    from models.settings import load_settings

    monkeypatch.setenv("SDQUEUE_METRICS_PORT", str(free_port()))
    return load_settings()


def scrape(url: str, **kwargs: Any) -> Samples:
    answer = httpx.get(url, timeout=30, **kwargs)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(answer.text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


# ---------------------------------------------------------------- the API


def test_api_metrics_count_jobs_queues_webhooks_and_requests(settings, client, make_key):
    queue, bulk = f"{settings.queue}.tiny", f"{settings.queue}.tiny.bulk"  # the default model's queues
    with serving(settings.model_copy(update={"webhook_allow_private": True})) as url:
        before = scrape(f"{url}/metrics")  # no key needed, as for /healthz
        token = make_key()
        for seed in (1, 2):
            assert httpx.post(f"{url}/v1/jobs", json=small(prompt="a fox", seed=seed), headers=bearer(token),
                              timeout=30).status_code == 201
        hooked = httpx.post(f"{url}/v1/jobs", json=small(prompt="a hook", webhook_url="http://127.0.0.1:9/hook"),
                            headers=bearer(token), timeout=30).json()["id"]
        assert httpx.delete(f"{url}/v1/jobs/{hooked}", headers=bearer(token), timeout=30).status_code == 200
        for seed in (1, 2, 3):
            client.submit(small(prompt="a bulk fox", seed=seed), priority="bulk")
        # a model no worker serves: queued, in a queue of its own
        unserved = httpx.post(f"{url}/v1/jobs", json=small(prompt="a sofa", model="sd21-base"), headers=bearer(token),
                              timeout=30).json()["id"]
        assert httpx.get(f"{url}/v1/jobs", timeout=30).status_code == 401  # the API still wants keys
        after = scrape(f"{url}/metrics")

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("sdqueue_jobs", state="queued", priority="interactive") == 3
    assert grew("sdqueue_jobs", state="queued", priority="bulk") == 3
    assert grew("sdqueue_jobs", state="cancelled", priority="interactive") == 1
    for state in ("queued", "running", "succeeded", "failed", "cancelled"):
        for priority in ("interactive", "bulk"):
            assert ("sdqueue_jobs", frozenset({("state", state), ("priority", priority)})) in after
    assert value(after, "sdqueue_jobs_oldest_queued_seconds", priority="bulk") >= 0
    # this test's own queues: the cancelled job's message stays until a worker drops it
    assert value(after, "sdqueue_queue_depth", queue=queue, priority="interactive", model="tiny") == 3
    assert value(after, "sdqueue_queue_depth", queue=bulk, priority="bulk", model="tiny") == 3
    assert value(after, "sdqueue_queue_depth", queue=f"{settings.queue}.sd21-base", priority="interactive",
                 model="sd21-base") == 1
    assert grew("sdqueue_jobs_queued_by_model", model="sd21-base") == 1
    assert grew("sdqueue_jobs_queued_by_model", model="tiny") == 5
    client.cancel(unserved)
    assert grew("sdqueue_webhook_deliveries", state="pending") == 1
    for result in ("2xx", "3xx", "4xx", "5xx", "error"):
        assert ("sdqueue_webhook_attempts_total", frozenset({("result", result)})) in after
    assert value(after, "sdqueue_metrics_source_up", source="database") == 1
    assert value(after, "sdqueue_metrics_source_up", source="broker") == 1
    assert value(after, "sdqueue_api_requests_total", method="POST", route="/v1/jobs", status="201") == 4
    assert value(after, "sdqueue_api_requests_total", method="GET", route="/v1/jobs", status="401") == 1
    assert value(after, "sdqueue_api_requests_total", method="GET", route="/metrics", status="200") == 1
    assert value(after, "sdqueue_api_request_seconds_count", method="DELETE", route="/v1/jobs/{job_id}") == 1


def test_api_metrics_say_which_source_is_down(settings_env):
    from models.settings import load_settings

    broken = load_settings(broker_url="redis://127.0.0.1:1/0", database_url="postgresql://nobody@127.0.0.1:1/none")
    with serving(broken) as url:
        samples = scrape(f"{url}/metrics")
    assert value(samples, "sdqueue_metrics_source_up", source="database") == 0
    assert value(samples, "sdqueue_metrics_source_up", source="broker") == 0
    assert not any(name == "sdqueue_jobs" for name, _ in samples)


def test_api_processes_count_requests_together(settings_env, tmp_path):
    # `sdqueue api --workers 2`: whichever process answers a scrape, it counts both processes' requests
    port = free_port()
    env = {**os.environ, "SDQUEUE_API_AUTH": "off", "TMPDIR": str(tmp_path)}  # where its counting folder goes
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    log = (tmp_path / "api.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "producer.cli", "api", "--port", str(port), "--workers", "2"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            try:
                return httpx.get(f"{url}/healthz", timeout=5).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up, timeout=90, step=0.2)
        assert list(tmp_path.glob("sdqueue-api-metrics-*"))
        for _ in range(19):  # with the probe above: 20 (new connections: both processes answer some)
            assert httpx.get(f"{url}/healthz", timeout=30).status_code == 200
        counts = [value(scrape(f"{url}/metrics"), "sdqueue_api_requests_total", method="GET", route="/healthz",
                        status="200") for _ in range(4)]
        assert counts == [20.0] * 4, counts
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
    assert not list(tmp_path.glob("sdqueue-api-metrics-*"))  # removed when it stopped


# ---------------------------------------------------------------- a worker


def test_a_worker_serves_its_metrics(settings, client, worker):
    from worker.tasks import generate

    server = generate.context.metrics_server
    assert server is not None and server.port == settings.metrics_port
    url = f"http://127.0.0.1:{server.port}/metrics"
    before = scrape(url)
    ids = [client.submit(small(prompt="a lighthouse", num_images=2, seed=seed)) for seed in (1, 2)]
    bad = client.submit(small(prompt='("a cat", "a dog").blend(0.5)', use_compel=True, seed=3))
    assert [client.wait(job_id, timeout=TIMEOUT)["state"] for job_id in ids] == ["succeeded", "succeeded"]
    assert client.wait(bad, timeout=TIMEOUT)["state"] == "failed"

    def settled() -> Samples | None:  # a job's task thread may settle it a moment after its row
        samples = scrape(url)
        return samples if value(samples, "sdqueue_worker_jobs_held") == 0 else None

    after = wait_for(settled, timeout=30)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("sdqueue_worker_images_total") == 4
    assert grew("sdqueue_worker_png_encode_seconds_total") > 0  # the CPU time of 4 PNGs
    assert grew("sdqueue_worker_jobs_ended_total", outcome="succeeded") == 2
    assert grew("sdqueue_worker_jobs_ended_total", outcome="failed") == 1
    assert grew("sdqueue_worker_failures_total", reason="prompt-unparsable") == 1
    calls = grew("sdqueue_worker_loop_occupancy_count")
    assert 3 <= calls <= 6  # 3 steps each: 3 calls when they shared every one, 6 when none
    assert grew("sdqueue_worker_loop_occupancy_sum") == 2 * 2 * 3  # samples x steps
    assert grew("sdqueue_worker_step_seconds_count") == calls and grew("sdqueue_worker_step_seconds_sum") > 0
    assert grew("sdqueue_worker_queue_seconds_count") == 3
    assert grew("sdqueue_worker_gpu_seconds_count") == 2
    (info,) = [dict(labels) for name, labels in after if name == "sdqueue_worker_info"]
    assert info["model"] == "tiny" and info["device"] == "cpu" and info["batching"] == "continuous"
    assert not any(name.startswith("sdqueue_worker_gpu_memory") for name, _ in after)  # the CPU has none
    assert any(name.startswith("process_") for name, _ in after)  # prometheus_client's own
    assert ("sdqueue_worker_quarantined", frozenset()) in after and value(after, "sdqueue_worker_quarantined") == 0


def test_a_taken_metrics_port_moves_to_the_next_and_0_is_off(settings):
    from worker import metrics

    assert metrics.serve(settings.model_copy(update={"metrics_port": 0}), None) is None
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = metrics.serve(settings.model_copy(update={"metrics_port": port}), None)
        try:
            assert server is not None and port < server.port < port + metrics.PORT_TRIES
            assert "python_info" in httpx.get(f"http://127.0.0.1:{server.port}/metrics", timeout=30).text
        finally:
            metrics.stop(server)


def test_metrics_listen_on_loopback_unless_told(settings):
    from worker import metrics

    assert settings.metrics_host == "127.0.0.1"  # the default: not every interface
    for host in ("127.0.0.1", "0.0.0.0"):  # the deploy manifests set 0.0.0.0 for Prometheus
        server = metrics.serve(settings.model_copy(update={"metrics_port": free_port(), "metrics_host": host}), None)
        try:
            assert server is not None and server.server.server_address[0] == host
            assert "python_info" in httpx.get(f"http://127.0.0.1:{server.port}/metrics", timeout=30).text
        finally:
            metrics.stop(server)


def test_cuda_memory_and_utilisation_are_read_at_scrape_time(monkeypatch):
    # no GPU here: torch.cuda's readings stand in, as a CUDA worker's collector reads them
    from types import SimpleNamespace

    import torch
    from prometheus_client import CollectorRegistry, generate_latest

    from worker.metrics import EngineCollector

    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 4 * 2**30)
    monkeypatch.setattr(torch.cuda, "utilization", lambda device: 87)
    collector = EngineCollector()
    collector.engine = SimpleNamespace(hostname="gpu-1", batching="continuous", _held={"a": 1, "b": 2},
                                       quarantined=False, spool=None,
                                       model=SimpleNamespace(device="cuda:0", spec=SimpleNamespace(name="sd21")))
    registry = CollectorRegistry()
    registry.register(collector)  # type: ignore[arg-type]
    samples = {(s.name, frozenset(s.labels.items())): s.value
               for f in text_string_to_metric_families(generate_latest(registry).decode()) for s in f.samples}
    assert value(samples, "sdqueue_worker_gpu_memory_allocated_bytes", device="cuda:0") == 3 * 2**30
    assert value(samples, "sdqueue_worker_gpu_memory_reserved_bytes", device="cuda:0") == 4 * 2**30
    assert value(samples, "sdqueue_worker_gpu_utilization_ratio", device="cuda:0") == 0.87
    assert value(samples, "sdqueue_worker_jobs_held") == 2
    assert ("sdqueue_worker_quarantined", frozenset()) in samples and value(samples, "sdqueue_worker_quarantined") == 0
    assert not any(name.startswith("sdqueue_worker_spool") for name, _ in samples)  # no spool: no series
    # quarantined, its spool's disk full: what the dashboard's "Quarantined workers" and "Spool" plot
    collector.engine.quarantined = True
    collector.engine.spool = SimpleNamespace(bytes=35_200_000, disk_full=True)
    samples = {(s.name, frozenset(s.labels.items())): s.value
               for f in text_string_to_metric_families(generate_latest(registry).decode()) for s in f.samples}
    assert value(samples, "sdqueue_worker_quarantined") == 1
    assert value(samples, "sdqueue_worker_spool_bytes") == 35_200_000
    assert value(samples, "sdqueue_worker_spool_disk_full") == 1
    monkeypatch.setattr(torch.cuda, "utilization", lambda device: (_ for _ in ()).throw(ModuleNotFoundError("pynvml")))
    assert b"utilization" not in generate_latest(registry)  # no NVML: no series, and the rest still served
    assert b"sdqueue_worker_gpu_memory_reserved_bytes" in generate_latest(registry)


# ---------------------------------------------------------------- names and the dashboard


def test_the_dashboard_plots_only_metrics_that_exist():
    from models import metrics

    dashboard = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "sdqueue.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    used = {name for expr in exprs for name in re.findall(r"\bsdqueue_[a-z0-9_]+", expr)}
    assert used and used <= metrics.series_names(), used - metrics.series_names()
    # every metric is on the dashboard
    assert {m.name for m in metrics.ALL} <= {n.removesuffix(s) for n in used for s in ("_bucket", "_sum", "_count", "")}
    assert all(p["datasource"]["uid"] == "prometheus" for p in dashboard["panels"] if p["type"] != "row")
    provider = (ROOT / "deploy" / "grafana" / "provisioning" / "dashboards" / "sdqueue.yaml").read_text()
    assert "/etc/grafana/dashboards" in provider
    assert "./grafana/dashboards:/etc/grafana/dashboards:ro" in (ROOT / "deploy" / "compose.yaml").read_text()


def test_metric_names_follow_prometheus_conventions():
    from models import metrics

    names = [m.name for m in metrics.ALL]
    assert len(names) == len(set(names)) and all(re.fullmatch(r"sdqueue_[a-z0-9_]+", n) for n in names)
    for metric in metrics.ALL:
        assert (metric.kind == "counter") == metric.name.endswith("_total"), metric.name
        assert bool(metric.buckets) == (metric.kind == "histogram"), metric.name
    assert {m.name for m in metrics.WORKER} == {n for n in names if n.startswith("sdqueue_worker_")}
