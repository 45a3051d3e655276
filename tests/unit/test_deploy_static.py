"""Static checks of the deployment files (deploy/systemd, deploy/compose, deploy/helm): what cannot run
here (systemd as PID 1, a docker daemon, a Kubernetes cluster, helm) is validated without running it.

- systemd: ``systemd-analyze verify`` on each unit (``ExecStart`` pointed at this checkout's
  ``.venv/bin/dicom-node``) must print nothing; the hardening keys are read from the unit files.
- compose: ``compose.yaml`` against the vendored compose-spec JSON schema; the image's entry point runs.
- Helm: ``Chart.yaml``, ``values.yaml`` against ``values.schema.json``; each template, with whole-line
  ``{{ ... }}`` directives dropped and inline ones replaced by a placeholder, parses as YAML and
  validates against the vendored Kubernetes v1.33 schema of its kind (errors on placeholders aside).
  ``helm lint`` / ``helm template`` are not run here (helm is not installed).
- Every configuration the deployments mount loads with ``node.config`` and passes ``node.checks``.
Schemas: tests/data/schemas/README.md (sources, versions, licenses); nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from referencing import Registry, Resource

from node.checks import check_models
from node.config import Settings, load_settings, parse_settings
from testkit.harness import free_port, wait_for

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SYSTEMD = DEPLOY / "systemd"
COMPOSE = DEPLOY / "compose"
CHART = DEPLOY / "helm" / "dicom-node"
SCHEMAS = ROOT / "tests" / "data" / "schemas"
K8S = SCHEMAS / "kubernetes-v1.33.0"
INSTALLED_BIN = "/opt/dicom-node/.venv/bin/dicom-node"
VENV_BIN = Path(sys.executable).parent / "dicom-node"
UNITS = ["dicom-node.service", "dicom-node-worker.service", "dicom-node-worker@.service"]
SECRET_ENV = {"DICOM_NODE__QUEUE__BROKER_URL": "redis://:pw@redis:6379/0",
              "DICOM_NODE__CATALOG__URL": "postgresql+psycopg://dicom_node:pw@postgres:5432/dicom_node"}
PLACEHOLDER = "HELM-TEMPLATED"

# ---------------------------------------------------------------- systemd


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file as section -> key -> values (a key may repeat, e.g. Environment=)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path.name}: {line!r} outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not key=value: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def _verify(unit_dir: Path, name: str) -> subprocess.CompletedProcess[str]:
    """``systemd-analyze verify`` of ``name`` (a template is verified as its instance ``@0``)."""
    target = name.replace("@.service", "@0.service")
    return subprocess.run(["systemd-analyze", "verify", "--man=no", target], cwd=unit_dir,
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture
def unit_copies(tmp_path: Path) -> Path:
    """The units with ExecStart/ExecStartPre pointed at this checkout's dicom-node (verify needs it to exist)."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed (Debian's systemd package)")
    assert VENV_BIN.exists(), VENV_BIN
    for name in UNITS:
        text = (SYSTEMD / name).read_text()
        assert INSTALLED_BIN in text
        (tmp_path / name).write_text(text.replace(INSTALLED_BIN, str(VENV_BIN)))
    return tmp_path


@pytest.mark.parametrize("name", UNITS)
def test_systemd_analyze_verify(unit_copies: Path, name: str) -> None:
    r = _verify(unit_copies, name)
    assert r.returncode == 0 and not r.stderr.strip() and not r.stdout.strip(), r.stderr + r.stdout


def test_systemd_analyze_verify_reports_a_bad_unit(unit_copies: Path) -> None:
    """The check above can fail: an unknown key and a missing binary are both reported."""
    for name in ("dicom-node.service", "dicom-node-worker@.service"):
        path = unit_copies / name
        path.write_text(path.read_text().replace("ProtectHome=", "ProtectHomes="))
        r = _verify(unit_copies, name)
        assert "ProtectHomes" in r.stderr, r.stderr
    path = unit_copies / "dicom-node-worker.service"
    path.write_text((SYSTEMD / path.name).read_text())  # /opt/dicom-node/... does not exist here
    r = _verify(unit_copies, path.name)
    assert r.returncode != 0 and INSTALLED_BIN in r.stderr, r.stderr


@pytest.mark.parametrize("name", UNITS)
def test_systemd_security_exposure(unit_copies: Path, name: str) -> None:
    """``systemd-analyze security --offline=true`` rates each unit "OK" (measured: 1.6 receiver, 1.7 CPU
    worker, 2.1 GPU worker; 10 = no hardening)."""
    target = name.replace("@.service", "@0.service")
    r = subprocess.run(["systemd-analyze", "security", "--offline=true", target], cwd=unit_copies,
                       capture_output=True, text=True, timeout=60, check=False)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", r.stdout)
    assert m, r.stdout[-2000:] + r.stderr
    assert float(m.group(1)) <= 2.5, r.stdout


HARDENING = {
    "User": "dicom-node", "Group": "dicom-node", "ProtectSystem": "strict", "ProtectHome": "yes",
    "PrivateTmp": "yes", "NoNewPrivileges": "yes", "CapabilityBoundingSet": "", "AmbientCapabilities": "",
    "SystemCallFilter": "@system-service", "SystemCallArchitectures": "native", "Restart": "on-failure",
    "RestartPreventExitStatus": "2", "KillSignal": "SIGTERM", "KillMode": "mixed",
    "EnvironmentFile": "/etc/dicom-node/secrets.env", "ReadWritePaths": "/var/lib/dicom-node",
    "StateDirectory": "dicom-node", "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes",
    "ProtectControlGroups": "yes", "RestrictNamespaces": "yes", "RestrictSUIDSGID": "yes", "LockPersonality": "yes",
}


@pytest.mark.parametrize("name", UNITS)
def test_systemd_hardening(name: str) -> None:
    service = parse_unit(SYSTEMD / name)["Service"]
    one = {k: v[-1] for k, v in service.items()}
    wrong = {k: (one.get(k), want) for k, want in HARDENING.items() if one.get(k) != want}
    assert not wrong, f"{name}: (have, want) {wrong}"
    families = set(one["RestrictAddressFamilies"].split())
    assert {"AF_INET", "AF_INET6", "AF_UNIX"} <= families <= {"AF_INET", "AF_INET6", "AF_UNIX", "AF_NETLINK"}
    exec_start = one["ExecStart"].split()
    assert exec_start[:4] == [INSTALLED_BIN, "run" if name == "dicom-node.service" else "worker",
                              "-c", "/etc/dicom-node/config.yaml"]
    # The receiver never loads torch (no JIT): W^X enforced; the workers' torch JIT needs it off.
    assert one["MemoryDenyWriteExecute"] == ("yes" if name == "dicom-node.service" else "no")
    gpu = name.endswith("@.service")
    assert one["PrivateDevices"] == ("no" if gpu else "yes")  # /dev/nvidia* for GPU workers
    if gpu:
        env = " ".join(service["Environment"]).split()
        assert "CUDA_VISIBLE_DEVICES=%i" in env
        assert exec_start[4:] == ["--queues", "gpu", "--concurrency", "1"]
    elif name == "dicom-node-worker.service":
        assert exec_start[4:] == ["--queues", "cpu"]
    assert parse_unit(SYSTEMD / name)["Install"]["WantedBy"] == ["multi-user.target"]


# The kernel's equivalent of MemoryDenyWriteExecute= (prctl PR_SET_MDWE, Linux 6.3+): no W+X mapping,
# no mprotect adding PROT_EXEC; kept across execve, so the launcher sets it and execs the node.
MDWE_LAUNCHER = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
    sys.exit(77)
os.execv(sys.argv[1], sys.argv[1:])
"""


def _http_ok(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


@pytest.mark.slow
def test_receiver_runs_with_memory_deny_write_execute_and_stops_on_sigterm(tmp_path: Path) -> None:
    """The receiver unit's MemoryDenyWriteExecute=yes: ``dicom-node run`` (the systemd config, on
    loopback ports, SQLite catalog, embedded broker) serves /healthz under the kernel's W^X rule,
    and SIGTERM (the units' KillSignal) makes it exit 0."""
    data = yaml.safe_load((SYSTEMD / "config.yaml").read_text())
    dicom_port, http_port = free_port(), free_port()
    data["node"].update(host="127.0.0.1", port=dicom_port, storage_dir=str(tmp_path / "storage"))
    data["http"]["port"] = http_port
    data["queue"]["broker_url"] = ""
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(data))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_NODE")}
    with open(tmp_path / "node.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", MDWE_LAUNCHER, str(VENV_BIN), "run", "-c", str(config)],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        def up() -> bool:
            if proc.poll() is not None:
                if proc.returncode == 77:
                    pytest.skip("this kernel has no PR_SET_MDWE (Linux < 6.3)")
                raise AssertionError((tmp_path / "node.log").read_text()[-3000:])
            return _http_ok(http_port)

        wait_for(up, 60, what="dicom-node run /healthz")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, (tmp_path / "node.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------- configurations the deployments mount


def _check(settings: Settings) -> None:
    assert not settings.queue.embedded_workers and settings.queue.broker_url == SECRET_ENV[
        "DICOM_NODE__QUEUE__BROKER_URL"]
    assert str(settings.node.storage_dir) == "/var/lib/dicom-node"
    check_models(settings)
    for queues in (["cpu"], ["gpu"]):
        check_models(settings, queues=queues)  # the models of each worker kind are installed


@pytest.mark.parametrize("path", [SYSTEMD / "config.yaml", COMPOSE / "config.yaml"], ids=["systemd", "compose"])
def test_mounted_config_is_valid(path: Path) -> None:
    settings = load_settings(path, environ=SECRET_ENV)
    _check(settings)
    assert settings.catalog.url == SECRET_ENV["DICOM_NODE__CATALOG__URL"]


def test_helm_config_is_valid() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    data = json.loads(json.dumps(values["config"]))
    data["queue"]["broker_url"] = SECRET_ENV["DICOM_NODE__QUEUE__BROKER_URL"]
    data["catalog"]["url"] = SECRET_ENV["DICOM_NODE__CATALOG__URL"]
    settings = parse_settings(data, "values.yaml config")
    _check(settings)
    service = values["receiver"]["service"]
    assert (settings.node.port, settings.http.port) == (11112, 8080)  # the templates' containerPorts
    assert service["dicomPort"] == settings.node.port and service["httpPort"] == settings.http.port


def test_compose_entrypoint_reads_secret_files(tmp_path: Path) -> None:
    """The image's entry point turns *_FILE variables into the node's settings and runs dicom-node."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_NODE")}
    for key, value in SECRET_ENV.items():
        f = tmp_path / key.lower()
        f.write_text(value + "\n")
        env[key + "_FILE"] = str(f)
    env["DICOM_NODE_BIN"] = str(VENV_BIN)
    cmd = ["sh", str(COMPOSE / "entrypoint.sh"), "check-config", "-c", str(COMPOSE / "config.yaml")]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0 and "broker: external" in r.stdout, r.stdout + r.stderr
    env["DICOM_NODE__CATALOG__URL_FILE"] = str(tmp_path / "missing")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 2 and "DICOM_NODE__CATALOG__URL_FILE" in r.stderr, r.stdout + r.stderr


# ---------------------------------------------------------------- compose


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = yaml.safe_load((COMPOSE / "compose.yaml").read_text())  # resolves the <<: merge keys
    assert isinstance(doc, dict)
    return doc


def test_compose_matches_compose_spec(compose: dict[str, Any]) -> None:
    schema = json.loads((SCHEMAS / "compose-spec.json").read_text())
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(compose), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)
    bad = dict(compose, services={**compose["services"], "redis": {**compose["services"]["redis"], "restart": 3}})
    assert not jsonschema.Draft7Validator(schema).is_valid(bad)  # the schema does reject a mistake


def test_compose_services(compose: dict[str, Any]) -> None:
    s = compose["services"]
    assert set(s) == {"node", "worker-cpu", "worker-gpu", "redis", "postgres", "orthanc"}
    assert "--appendonly yes" in " ".join(s["redis"]["command"])
    assert "ping" in " ".join(s["redis"]["healthcheck"]["test"])
    assert "/healthz" in " ".join(s["node"]["healthcheck"]["test"])
    devices = s["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
    assert s["worker-gpu"]["command"][-4:] == ["--queues", "gpu", "--concurrency", "1"]
    assert s["worker-cpu"]["command"][-2:] == ["--queues", "cpu"]
    for name in ("node", "worker-cpu", "worker-gpu"):
        svc = s[name]
        assert svc["configs"] == [{"source": "node_config", "target": "/etc/dicom-node/config.yaml"}]
        assert svc["volumes"] == ["storage:/var/lib/dicom-node"] and svc["cap_drop"] == ["ALL"]
        assert set(svc["secrets"]) == {"broker_url", "catalog_url"}
        assert {k: v for k, v in svc["environment"].items() if k.startswith("DICOM_NODE")} == {
            "DICOM_NODE__QUEUE__BROKER_URL_FILE": "/run/secrets/broker_url",
            "DICOM_NODE__CATALOG__URL_FILE": "/run/secrets/catalog_url"}
    assert s["postgres"]["environment"]["POSTGRES_PASSWORD_FILE"] == "/run/secrets/postgres_password"
    assert (COMPOSE / compose["configs"]["node_config"]["file"]).resolve() == COMPOSE / "config.yaml"


def test_dockerfile_copies_what_exists() -> None:
    text = (COMPOSE / "Dockerfile").read_text()
    ignore = (COMPOSE / "Dockerfile.dockerignore").read_text().split()
    for line in text.splitlines():
        if line.startswith("COPY") and "--from=" not in line:
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), src
                assert f"!{src}" in ignore or f"!{src}/" in ignore, f"{src} is excluded from the build context"
    assert re.search(r'pip install "/src\[ml\]"', text) and "USER dicom-node" in text


@pytest.mark.skipif(shutil.which("docker") is None, reason="no docker CLI")
def test_docker_compose_config() -> None:
    """``docker compose config`` (no daemon needed) where the compose plugin is installed."""
    if subprocess.run(["docker", "compose", "version"], capture_output=True, check=False).returncode != 0:
        pytest.skip("docker CLI without the compose plugin (the schema test above still runs)")
    r = subprocess.run(["docker", "compose", "-f", str(COMPOSE / "compose.yaml"), "config", "--quiet"],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------- Helm


def test_chart_metadata() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert chart["apiVersion"] == "v2" and chart["name"] == CHART.name and chart["type"] == "application"
    assert re.fullmatch(r"\d+\.\d+\.\d+", chart["version"]) and chart["appVersion"] == version


def test_values_match_schema() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    validator = jsonschema.Draft7Validator(schema)
    assert not list(validator.iter_errors(values))
    wrong = json.loads(json.dumps(values))
    wrong["workers"]["gpu"]["gpusPerPod"] = 2
    assert not validator.is_valid(wrong)


def _strip_template(text: str) -> str:
    """Whole-line ``{{ ... }}`` directives dropped, inline ones replaced by a placeholder scalar."""
    lines = [ln for ln in text.splitlines() if not re.fullmatch(r"\s*\{\{.*\}\}\s*", ln)]
    return re.sub(r"\{\{.*?\}\}", PLACEHOLDER, "\n".join(lines))


def _manifests() -> Iterator[tuple[str, dict[str, Any]]]:
    for path in sorted((CHART / "templates").glob("*.yaml")):
        for doc in yaml.safe_load_all(_strip_template(path.read_text())):
            if doc is not None:
                yield path.name, doc


SCHEMA_FILES = {("apps/v1", "Deployment"): "deployment-apps-v1.json", ("v1", "Service"): "service-v1.json",
                ("v1", "ConfigMap"): "configmap-v1.json",
                ("v1", "PersistentVolumeClaim"): "persistentvolumeclaim-v1.json",
                ("networking.k8s.io/v1", "NetworkPolicy"): "networkpolicy-networking-v1.json"}


def _placeholder_error(err: jsonschema.ValidationError) -> bool:
    return PLACEHOLDER in json.dumps(err.instance)


def test_templates_validate_against_kubernetes_schemas() -> None:
    defs = json.loads((K8S / "_definitions.json").read_text())
    registry: Registry[Any] = Registry().with_resource(defs["$id"], Resource.from_contents(defs))
    kinds = []
    for name, doc in _manifests():
        key = (doc.get("apiVersion"), doc.get("kind"))
        assert key in SCHEMA_FILES, f"{name}: {key} has no vendored schema"
        kinds.append(key[1])
        schema = json.loads((K8S / SCHEMA_FILES[key]).read_text())
        validator = jsonschema.Draft202012Validator(schema, registry=registry)
        errors = [e for e in validator.iter_errors(doc) if not _placeholder_error(e)]
        assert not errors, f"{name}: " + "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)
    assert sorted(kinds) == sorted(["ConfigMap", "NetworkPolicy", "NetworkPolicy", "PersistentVolumeClaim",
                                    "Deployment", "Deployment", "Deployment", "Service"])


def test_templates_schema_check_can_fail() -> None:
    defs = json.loads((K8S / "_definitions.json").read_text())
    registry: Registry[Any] = Registry().with_resource(defs["$id"], Resource.from_contents(defs))
    doc = next(d for n, d in _manifests() if n == "receiver.yaml")
    doc["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "dicom"
    validator = jsonschema.Draft202012Validator(json.loads((K8S / "deployment-apps-v1.json").read_text()),
                                                registry=registry)
    assert any(not _placeholder_error(e) for e in validator.iter_errors(doc))


def test_templates_reference_existing_values() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for path in (CHART / "templates").iterdir():
        for ref in re.findall(r"\.Values\.([A-Za-z0-9_.]+)", path.read_text()):
            node: Any = values
            for part in ref.split("."):
                assert isinstance(node, dict) and part in node, f"{path.name}: .Values.{ref} not in values.yaml"
                node = node[part]


def test_gpu_worker_template() -> None:
    text = (CHART / "templates" / "worker-gpu.yaml").read_text()
    assert text.count("nvidia.com/gpu: {{ .Values.workers.gpu.gpusPerPod }}") == 2  # requests and limits
    assert '"--queues", "gpu", "--concurrency", "1"' in text
