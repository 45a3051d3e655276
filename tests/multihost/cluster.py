"""A node cluster on a private network of namespaces (:mod:`testkit.netns`): PostgreSQL, Redis and
Orthanc (the PACS) each on their own host, the node (receiver and HTTP API, no embedded workers) on
``recv``, a ``scanner`` host that pushes studies, and worker hosts with their own host names and
storage directories that reach the node only through its HTTP API and Redis (remote workers).

The test process reaches a service from inside a host (:meth:`testkit.netns.Host.entered`): the
node's API and Orthanc's REST API from ``scanner`` and ``pacs``; nothing is routed from the root
namespace."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from testkit.harness import (
    ORTHANC_AE,
    SCANNER_AE,
    Orthanc,
    Redis,
    bearer,
    create_token,
    free_port,
    node_config,
    start_node_process,
    stop_process,
    storescu,
    wait_for,
)
from testkit.netns import Host, Network
from testkit.postgres import PostgresServer, postgres_server

MODEL = "ct-hu-segmentation"
WORKER_LOST_SECONDS = 10.0
"""``queue.worker_lost_seconds`` of the cluster (its minimum): a killed host's job is re-run soon."""


@dataclass
class Cluster:
    """The running services; :meth:`api` and :meth:`orthanc_instances` query them from inside the network."""

    net: Network
    workdir: Path
    pg: PostgresServer
    redis: Redis
    orthanc: Orthanc
    node_port: int
    http_port: int
    config: Path
    token: str
    """A viewer token for the test's own API calls."""
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    """Host name -> the node or worker process started there."""

    def host(self, name: str) -> Host:
        return self.net.hosts[name]

    @property
    def node_url(self) -> str:
        return f"http://{self.host('recv').addr}:{self.http_port}"

    def api(self, path: str, **params: Any) -> Any:
        """``GET /api/v1<path>`` of the node, from the scanner host (a client on the network)."""
        with self.host("scanner").entered(), httpx.Client(timeout=10) as client:
            r = client.get(f"{self.node_url}/api/v1{path}", params=params, headers=bearer(self.token))
        r.raise_for_status()
        return r.json()

    def jobs(self) -> list[dict[str, Any]]:
        return list(self.api("/jobs", limit=500)["items"])

    def orthanc_instances(self, study_uid: str) -> dict[str, list[str]]:
        """Modality -> SOP Instance UIDs of every instance Orthanc holds for the study."""
        out: dict[str, list[str]] = {}
        with self.host("pacs").entered():
            for series in self.orthanc.series_of_study(study_uid):
                modality = series["MainDicomTags"].get("Modality", "")
                for inst in self.orthanc.get(f"/series/{series['ID']}/instances"):
                    out.setdefault(modality, []).append(inst["MainDicomTags"]["SOPInstanceUID"])
        return out

    def push(self, series_dir: Path) -> None:
        """storescu from the scanner host to the node."""
        scanner = self.host("scanner")
        out = storescu(self.node_port, series_dir, host=self.host("recv").addr, prefix=tuple(scanner.prefix))
        if out.returncode != 0:
            raise RuntimeError(f"storescu failed: {out.stderr[-2000:]}")

    def start_worker(self, name: str) -> None:
        """``dicom-node worker`` on host ``name`` as a remote worker: its own storage directory, the
        broker on the Redis host, the node's API with a worker token; never the catalog."""
        host = self.host(name)
        wdir = self.workdir / name
        wdir.mkdir()
        token_file = wdir / "worker.token"
        with self.host("recv").entered():
            token_file.write_text(create_token(self.config, "worker", f"worker-{name}") + "\n")
        token_file.chmod(0o600)
        cfg = {
            "node": {"storage_dir": str(wdir / "storage")},
            "queue": {"broker_url": self.redis.url, "worker_concurrency": 1},
            "models": {MODEL: {}},
            "remote": {"node_url": self.node_url, "token_file": str(token_file)},
        }
        path = wdir / "worker.yaml"
        path.write_text(yaml.safe_dump(cfg))
        self.procs[name] = start_node_process(path, "worker", "worker.log", prefix=tuple(host.prefix))

    def log(self, name: str) -> str:
        """The tail of a log file under the work directory (for failure messages)."""
        path = self.workdir / name
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""


def build_network(net: Network) -> None:
    """The hosts of :func:`cluster`: services, the node, a scanner and two worker hosts."""
    for name in ("pg", "redis", "pacs", "recv", "scanner"):
        net.add_host(name)
    for name in ("w1", "w2"):
        net.add_host(name, own_hostname=True)


@contextlib.contextmanager
def cluster(net: Network, workdir: Path) -> Iterator[Cluster]:
    """Start PostgreSQL, Redis, Orthanc and the node on their hosts of ``net`` (from
    :func:`build_network`); the workers are started by the test. Everything stops on exit (the
    network's cleanup kills whatever is left)."""
    h = net.hosts
    with postgres_server(listen=h["pg"].addr, allow_cidr=net.cidr, prefix=tuple(h["pg"].prefix)) as pg:
        with h["pg"].entered():
            catalog_url = pg.create_database("node")
        redis = Redis(workdir, host=h["redis"].addr, prefix=tuple(h["redis"].prefix))
        node_port, http_port = free_port(), free_port()
        orthanc = Orthanc(workdir / "pacs", node_port=node_port, prefix=tuple(h["pacs"].prefix))
        procs: dict[str, subprocess.Popen[bytes]] = {}
        try:
            with h["redis"].entered():
                redis.start()
            (workdir / "pacs").mkdir()
            with h["pacs"].entered():
                orthanc.start()
            cfg = _node_config(net, workdir / "recv", node_port, http_port, catalog_url, redis, orthanc)
            with h["recv"].entered():
                token = create_token(cfg, "viewer", "test-viewer")
                procs["recv"] = start_node_process(cfg, "run", "node.log", port=node_port,
                                                   prefix=tuple(h["recv"].prefix), host=h["recv"].addr)
            c = Cluster(net, workdir, pg, redis, orthanc, node_port, http_port, cfg, token, procs)
            _wait_api(c)
            yield c
        finally:
            for proc in reversed(procs.values()):  # the workers before the node
                if proc.poll() is None:
                    stop_process(proc, timeout=10)
            orthanc.stop()
            redis.stop()


def _node_config(net: Network, recv_dir: Path, node_port: int, http_port: int, catalog_url: str, redis: Redis,
                 orthanc: Orthanc) -> Path:
    """The receiver's configuration: its addresses on ``recv``, the catalog on the pg host, the broker
    on the Redis host, the PACS on its host, no embedded workers, a short ``worker_lost_seconds``."""
    h = net.hosts
    recv_dir.mkdir()
    overrides = {
        "node": {"host": h["recv"].addr,
                 "peers": [{"ae_title": SCANNER_AE, "host": h["scanner"].addr, "allow": ["echo", "store"]}]},
        "http": {"host": h["recv"].addr},
        "catalog": {"url": catalog_url},
        "assembly": {"study_quiet_seconds": 1.0},
        "queue": {"worker_lost_seconds": WORKER_LOST_SECONDS, "in_flight": {"cpu": 2}},
        "destinations": [{"name": "pacs", "type": "dimse", "ae_title": ORTHANC_AE, "host": h["pacs"].addr,
                          "port": orthanc.dicom_port}],
    }
    return node_config(recv_dir, node_port=node_port, orthanc=orthanc, broker_url=redis.url,
                       embedded_workers=False, models=(MODEL,), http_port=http_port, overrides=overrides)


def _wait_api(c: Cluster, timeout: float = 30) -> None:
    def answers() -> bool:
        try:
            c.api("/jobs", limit=1)
            return True
        except httpx.HTTPError:
            return False

    wait_for(answers, timeout, what="the node's HTTP API")
