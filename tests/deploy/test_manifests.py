"""Deployment files: docker compose (replicas + Redis + nginx) and the Kubernetes manifests.

No cluster and no Docker engine here: the YAML is parsed and checked structurally, and the
Kubernetes objects are validated offline against the official API schemas bundled with
kubernetes-validate (skipped if that package is not installed).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "docker-compose.yml"
NGINX = DEPLOY / "nginx.conf"
DOCKERFILE = ROOT / "Dockerfile"

SERVER_PORT = 8000
SHARED_STORE = "redis://redis:6379/0"
# Oldest Kubernetes minor still commonly in service, and the newest the validator knows.
K8S_VERSIONS = ("1.29", "latest")

Doc = dict[str, Any]


def _yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml"))


def _load(path: Path) -> list[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


@pytest.fixture(scope="module")
def k8s_docs() -> list[tuple[Path, Doc]]:
    docs = [(p, d) for p in sorted(K8S.glob("*.y*ml")) for d in _load(p)]
    assert docs, f"no manifests in {K8S}"
    return docs


def _one(docs: list[tuple[Path, Doc]], kind: str, name: str | None = None) -> Doc:
    found = [
        d for _, d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def secret(k8s_docs: list[tuple[Path, Doc]]) -> Doc:
    return _one(k8s_docs, "Secret")


@pytest.fixture(scope="module")
def server(k8s_docs: list[tuple[Path, Doc]]) -> Doc:
    """The rnnserve Deployment: the one whose container runs rnn-serve on port 8000."""
    found = [
        d
        for _, d in k8s_docs
        if d["kind"] == "Deployment"
        and any(
            p.get("containerPort") == SERVER_PORT
            for c in d["spec"]["template"]["spec"]["containers"]
            for p in c.get("ports", [])
        )
    ]
    assert len(found) == 1, "expected exactly one Deployment serving port 8000"
    return found[0]


@pytest.fixture(scope="module")
def container(server: Doc) -> Doc:
    containers = server["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


# --------------------------------------------------------------------------- every YAML


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path: Path) -> None:
    docs = _load(path)
    assert docs, f"{path} is empty"
    assert all(isinstance(d, dict) for d in docs)


# --------------------------------------------------------------------------- Kubernetes


def test_k8s_kinds_and_no_namespace(k8s_docs: list[tuple[Path, Doc]]) -> None:
    kinds = {d["kind"] for _, d in k8s_docs}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "Secret"} <= kinds, kinds
    for path, d in k8s_docs:
        assert d.get("apiVersion") and d.get("metadata", {}).get("name"), path
        # Namespace-free: `kubectl apply -n <ns>` decides.
        assert "namespace" not in d["metadata"], f"{path}: {d['kind']} sets a namespace"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_schemas(k8s_docs: list[tuple[Path, Doc]], version: str) -> None:
    """Strict validation (unknown fields rejected) against the official OpenAPI schemas."""
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate not installed")
    if version == "latest":
        version = kv.latest_version()
    for path, d in k8s_docs:
        try:
            kv.validate(d, version, strict=True)
        except kv.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{path.name} {d['kind']}: {where}: {exc.message} (k8s {exc.version})")
        except kv.SchemaNotFoundError as exc:
            pytest.fail(f"{path.name}: {exc.message}")


def _container_port(container: Doc, port: int | str) -> int:
    if isinstance(port, int):
        return port
    (match,) = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    return match


def test_probes(container: Doc) -> None:
    ready = container["readinessProbe"]["httpGet"]
    live = container["livenessProbe"]["httpGet"]
    assert ready["path"] == "/readyz"
    assert live["path"] == "/healthz"
    assert _container_port(container, ready["port"]) == SERVER_PORT
    assert _container_port(container, live["port"]) == SERVER_PORT


def _env(container: Doc) -> dict[str, Doc]:
    return {e["name"]: e for e in container.get("env", [])}


def _secret_data(secret: Doc) -> dict[str, str]:
    return {**secret.get("data", {}), **secret.get("stringData", {})}


@pytest.mark.parametrize("var", ["RNNSERVE_SESSION_STORE", "RNNSERVE_API_KEYS"])
def test_env_from_secret(container: Doc, secret: Doc, var: str) -> None:
    env = _env(container)
    assert var in env, f"{var} not set"
    ref = env[var].get("valueFrom", {}).get("secretKeyRef")
    assert ref, f"{var} must come from the Secret (valueFrom.secretKeyRef), not a literal"
    assert ref["name"] == secret["metadata"]["name"]
    assert ref["key"] in _secret_data(secret)


def test_session_store_points_at_a_service(
    k8s_docs: list[tuple[Path, Doc]], secret: Doc, container: Doc
) -> None:
    key = _env(container)["RNNSERVE_SESSION_STORE"]["valueFrom"]["secretKeyRef"]["key"]
    url = urlparse(_secret_data(secret)[key])
    assert url.scheme in ("redis", "rediss"), "replicas need a shared (Redis) session store"
    services = {d["metadata"]["name"]: d for _, d in k8s_docs if d["kind"] == "Service"}
    if url.hostname in services:  # the bundled Redis; otherwise a managed one
        ports = [p["port"] for p in services[url.hostname]["spec"]["ports"]]
        assert (url.port or 6379) in ports


def _dockerfile_uid() -> int:
    users = re.findall(r"^USER\s+(\S+)", DOCKERFILE.read_text(), flags=re.MULTILINE)
    assert users, "no USER in the Dockerfile"
    return int(users[-1].split(":")[0])


def test_runs_as_non_root(server: Doc, container: Doc) -> None:
    pod = server["spec"]["template"]["spec"]
    pod_sc = pod.get("securityContext", {})
    for c in pod.get("initContainers", []) + pod["containers"]:
        sc = {**pod_sc, **c.get("securityContext", {})}
        assert sc.get("runAsNonRoot") is True, c["name"]
        assert sc.get("runAsUser", 0) != 0, c["name"]
        assert sc.get("readOnlyRootFilesystem") is True, c["name"]
        assert sc.get("allowPrivilegeEscalation") is False, c["name"]
        assert "ALL" in sc.get("capabilities", {}).get("drop", []), c["name"]
    sc = {**pod_sc, **container.get("securityContext", {})}
    assert sc["runAsUser"] == _dockerfile_uid(), "runAsUser should match the image's USER"


def test_resources(k8s_docs: list[tuple[Path, Doc]]) -> None:
    for path, d in k8s_docs:
        if d["kind"] != "Deployment":
            continue
        pod = d["spec"]["template"]["spec"]
        for c in pod.get("initContainers", []) + pod["containers"]:
            res = c.get("resources", {})
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res.get(part, {})), f"{path.name} {c['name']}"


def test_models_mounted_read_only(server: Doc, container: Doc) -> None:
    mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
    assert "/models" in mounts and mounts["/models"].get("readOnly") is True
    volumes = {v["name"] for v in server["spec"]["template"]["spec"]["volumes"]}
    assert mounts["/models"]["name"] in volumes
    args = container.get("command", []) + container.get("args", [])
    env = _env(container)
    repo = args[args.index("--model-repo") + 1] if "--model-repo" in args else None
    assert "/models" in (repo, env.get("RNNSERVE_MODEL_REPO", {}).get("value"))


def test_selectors_and_service(k8s_docs: list[tuple[Path, Doc]], server: Doc) -> None:
    for path, d in k8s_docs:
        if d["kind"] == "Deployment":
            selector = d["spec"]["selector"]["matchLabels"]
            labels = d["spec"]["template"]["metadata"]["labels"]
            assert selector.items() <= labels.items(), f"{path.name}: selector vs pod labels"
    pod_labels = server["spec"]["template"]["metadata"]["labels"]
    (container,) = server["spec"]["template"]["spec"]["containers"]
    services = [
        d
        for _, d in k8s_docs
        if d["kind"] == "Service" and d["spec"]["selector"].items() <= pod_labels.items()
    ]
    assert len(services) == 1, "expected one Service selecting the server pods"
    spec = services[0]["spec"]
    # Any pod can serve any session: no client-IP affinity.
    assert spec.get("sessionAffinity", "None") == "None"
    targets = [_container_port(container, p.get("targetPort", p["port"])) for p in spec["ports"]]
    assert SERVER_PORT in targets


def test_hpa(k8s_docs: list[tuple[Path, Doc]], server: Doc, container: Doc) -> None:
    hpa = _one(k8s_docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", server["metadata"]["name"])
    assert hpa["spec"].get("minReplicas", 1) >= 2
    assert hpa["spec"]["maxReplicas"] >= hpa["spec"]["minReplicas"]
    cpu = [
        m
        for m in hpa["spec"]["metrics"]
        if m["type"] == "Resource" and m["resource"]["name"] == "cpu"
    ]
    assert cpu, "scale on CPU"
    # Utilization targets are relative to the CPU request.
    assert "cpu" in container["resources"]["requests"]


# --------------------------------------------------------------------------- docker compose


def _interpolate(value: str) -> str:
    """Compose's ${VAR:-default} / ${VAR} with the defaults (the test's environment ignored)."""
    return re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: m.group(2) or "", value)


@pytest.fixture(scope="module")
def compose() -> Doc:
    (doc,) = _load(COMPOSE)
    return doc


def _server_services(compose: Doc) -> dict[str, Doc]:
    return {
        name: svc
        for name, svc in compose["services"].items()
        if "build" in svc or "rnnserve" in str(svc.get("image", "")).split(":")[0]
    }


def test_compose_redis(compose: Doc) -> None:
    redis = compose["services"].get("redis")
    assert redis and str(redis["image"]).startswith("redis:")
    assert "healthcheck" in redis


def test_compose_replicas_share_redis(compose: Doc) -> None:
    servers = _server_services(compose)
    assert servers, "no rnnserve service"
    replicas = sum(svc.get("deploy", {}).get("replicas", 1) for svc in servers.values())
    assert replicas >= 2, "run at least two server replicas"
    for name, svc in servers.items():
        env = svc.get("environment", {})
        if isinstance(env, list):
            env = dict(e.split("=", 1) for e in env)
        assert env.get("RNNSERVE_SESSION_STORE") == SHARED_STORE, name
        assert "redis" in svc.get("depends_on", {}), f"{name} should wait for redis"
        # Replicas cannot share a published host port: only the load balancer publishes.
        assert not svc.get("ports"), f"{name} publishes ports; go through the load balancer"
        build = svc["build"]
        context = (DEPLOY / build["context"]).resolve()
        assert (context / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE
        mounts = [m for m in svc.get("volumes", []) if isinstance(m, dict)]
        models = [m for m in mounts if m["target"] == "/models"]
        assert models and models[0].get("read_only") is True, "mount models read-only"
        assert (DEPLOY / _interpolate(models[0]["source"])).resolve() == ROOT / "models"


def test_compose_load_balancer(compose: Doc) -> None:
    servers = _server_services(compose)
    lbs = {
        name: svc
        for name, svc in compose["services"].items()
        if str(svc.get("image", "")).startswith("nginx:")
    }
    assert len(lbs) == 1, "expected one nginx load balancer"
    (lb,) = lbs.values()
    assert set(servers) <= set(lb.get("depends_on", {})), "the LB should start after the servers"
    assert lb.get("ports"), "the load balancer publishes the API"
    mounts = [m for m in lb.get("volumes", []) if isinstance(m, dict)]
    (conf,) = [m for m in mounts if m["target"].startswith("/etc/nginx/")]
    assert (DEPLOY / conf["source"]).resolve() == NGINX

    # The published container port is the one nginx listens on.
    published = [_interpolate(str(p)).rsplit(":", 1)[-1] for p in lb["ports"]]
    listens = re.findall(r"^\s*listen\s+(\d+)", _nginx_code(), flags=re.MULTILINE)
    assert set(published) <= set(listens), (published, listens)


# --------------------------------------------------------------------------- nginx


def _nginx_code() -> str:
    return "\n".join(line.split("#", 1)[0] for line in NGINX.read_text().splitlines())


def _block(code: str, head: str) -> str:
    """The body of the first `head { ... }` block."""
    start = re.search(head + r"\s*\{", code)
    assert start, f"no {head} block"
    depth, i = 1, start.end()
    while depth:
        depth += {"{": 1, "}": -1}.get(code[i], 0)
        i += 1
    return code[start.end() : i - 1]


def test_nginx_round_robin_with_websockets(compose: Doc) -> None:
    code = _nginx_code()
    assert code.count("{") == code.count("}"), "unbalanced braces"
    upstream_name = re.search(r"\bupstream\s+(\S+)\s*\{", code)
    assert upstream_name
    upstream = _block(code, r"\bupstream\s+" + re.escape(upstream_name.group(1)))
    for balancing in ("ip_hash", "hash", "sticky", "least_conn", "random"):
        assert not re.search(rf"^\s*{balancing}\b", upstream, flags=re.MULTILINE), (
            f"{balancing}: the load balancer must be plain round robin"
        )
    servers = re.findall(r"^\s*server\s+(\S+)", upstream, flags=re.MULTILINE)
    assert servers
    server_names = set(_server_services(compose))
    for address in servers:
        host, _, port = address.partition(":")
        assert host in server_names and port == str(SERVER_PORT), address

    assert f"proxy_pass http://{upstream_name.group(1)}" in code
    assert re.search(r"proxy_http_version\s+1\.1\s*;", code)
    assert re.search(r"proxy_set_header\s+Upgrade\s+\$http_upgrade\s*;", code)
    connection = re.search(r"proxy_set_header\s+Connection\s+(\S+)\s*;", code)
    assert connection, "pass the Connection header for WebSocket upgrades"
    if connection.group(1).startswith("$") and connection.group(1) != "$http_connection":
        mapping = _block(code, r"\bmap\s+\$http_upgrade\s+" + re.escape(connection.group(1)))
        assert "upgrade" in mapping
    else:
        assert connection.group(1).strip("\"'").lower() in ("upgrade", "$http_connection")


def test_readme_covers_the_basics() -> None:
    readme = (DEPLOY / "README.md").read_text()
    for topic in (r"docker compose .*\bup\b", r"kubectl .*\bapply\b", r"\bsecret\b", r"\bsticky\b"):
        assert re.search(topic, readme.lower()), f"deploy/README.md should cover {topic!r}"
