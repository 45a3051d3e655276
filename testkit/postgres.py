"""A throwaway PostgreSQL server for tests: ``initdb`` + ``pg_ctl`` from Debian's ``postgresql``
package in a temp directory, its own port on 127.0.0.1, its unix socket in that directory; stopped
and removed afterwards. Under root the server runs as the ``postgres`` user (initdb refuses root)."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from testkit.harness import free_port

SUPERUSER = "dicom_node"


def postgres_bin() -> Path | None:
    """The newest ``/usr/lib/postgresql/<major>/bin`` with ``initdb`` and ``pg_ctl``, or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found and Path(found[-1]).with_name("initdb").exists() else None


class PostgresServer:
    """One running server; :meth:`create_database` gives each test an empty database."""

    def __init__(self, bin_dir: Path, root: Path, *, listen: str = "127.0.0.1", allow_cidr: str | None = None,
                 prefix: tuple[str, ...] = ()) -> None:
        """``listen``: the address it binds and its URLs use; ``allow_cidr``: clients from this network
        are trusted too (pg_hba); ``prefix``: a command prefix for its programs (e.g. a network namespace's)."""
        self.bin_dir, self.root, self.port = bin_dir, root, free_port()
        self.data, self.socket_dir = root / "data", root / "run"
        self.listen, self.allow_cidr, self.prefix = listen, allow_cidr, prefix
        self._user = "postgres" if os.geteuid() == 0 else None

    def _run(self, *args: str) -> None:
        cmd = [str(self.bin_dir / args[0]), *args[1:]]
        if self._user is not None:
            cmd = ["runuser", "-u", self._user, "--", *cmd]
        cmd = [*self.prefix, *cmd]
        subprocess.run(cmd, check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        self.socket_dir.mkdir(parents=True)
        if self._user is not None:
            user = pwd.getpwnam(self._user)
            for path in (self.root, self.socket_dir):
                os.chown(path, user.pw_uid, user.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth=trust", "--no-sync",
                  "--encoding=UTF8", "--locale=C")
        if self.allow_cidr is not None:
            with open(self.data / "pg_hba.conf", "a") as hba:
                hba.write(f"host all all {self.allow_cidr} trust\n")
        options = (f"-c listen_addresses={self.listen} -p {self.port} -k {self.socket_dir} "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-o", options,
                  "-w", "-t", "30", "start")

    def stop(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def url(self, database: str = "postgres") -> str:
        """SQLAlchemy URL of ``database`` (psycopg 3 over TCP to :attr:`listen`)."""
        return f"postgresql+psycopg://{SUPERUSER}@{self.listen}:{self.port}/{database}"

    def create_database(self, prefix: str = "catalog") -> str:
        """A new empty database; returns its URL."""
        import psycopg

        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(host=self.listen, port=self.port, user=SUPERUSER, dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


@contextlib.contextmanager
def postgres_server(*, listen: str = "127.0.0.1", allow_cidr: str | None = None,
                    prefix: tuple[str, ...] = ()) -> Iterator[PostgresServer]:
    """Start a server for the block (arguments: :class:`PostgresServer`'s); raises FileNotFoundError
    when PostgreSQL is not installed."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        raise FileNotFoundError("PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin "
                                "(apt-get install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="dicom-node-pg-"))
    server = PostgresServer(bin_dir, root, listen=listen, allow_cidr=allow_cidr, prefix=prefix)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
