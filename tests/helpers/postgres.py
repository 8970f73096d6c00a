"""A real PostgreSQL server for the tests: Debian's binaries, a temporary cluster, a free port.

:class:`PostgresServer` runs ``initdb`` and ``pg_ctl`` from ``/usr/lib/postgresql/<version>/bin``
(Debian keeps them off ``PATH``) in a temporary folder. PostgreSQL refuses to run as root, so
when the tests run as root the cluster belongs to an unprivileged system user (``postgres``,
which Debian's package creates, else ``dicomnode-test``, created with ``useradd --system``) and
every server command runs through ``runuser -u USER --``.

The server listens on 127.0.0.1 only, on a free port, with its Unix socket inside the temporary
folder; ``fsync`` is off (a test cluster is thrown away). Host connections need a password
(SCRAM), so the URLs the tests hand to the node carry one, as a site's would. Each pytest-xdist
worker starts its own server; :meth:`PostgresServer.stop` (``pg_ctl stop -m immediate``, then
the folder is removed) runs at session end whatever happened.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers.ports import free_port

BIN_GLOB = "/usr/lib/postgresql/*/bin"
FALLBACK_USER = "dicomnode-test"
ROLE = "dicomnode"
"""The login role the node connects as (not a superuser; it may create databases)."""


class PostgresMissing(RuntimeError):
    """No PostgreSQL server binaries on this machine."""


def find_bin() -> Path:
    """The newest ``/usr/lib/postgresql/<version>/bin`` holding ``initdb`` and ``pg_ctl``.

    Raises
    ------
    PostgresMissing
        Debian's ``postgresql`` package is not installed.
    """
    found = [
        Path(d)
        for d in glob.glob(BIN_GLOB)
        if (Path(d) / "initdb").is_file() and (Path(d) / "pg_ctl").is_file()
    ]
    if not found:
        raise PostgresMissing(
            f"PostgreSQL server binaries not found ({BIN_GLOB}/initdb, pg_ctl): install Debian's "
            "`postgresql` package (`make test-deps` does: apt-get install postgresql)"
        )
    return max(found, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)


def _server_user() -> str | None:
    """The user the server runs as: None (the current one) unless we are root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", FALLBACK_USER):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    made = subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", FALLBACK_USER],
        capture_output=True,
        text=True,
    )
    if made.returncode not in (0, 9):  # 9: another xdist worker created it just now
        raise RuntimeError(f"useradd {FALLBACK_USER} failed: {made.stderr.strip()}")
    return FALLBACK_USER


@dataclass
class PostgresServer:
    """One throw-away PostgreSQL cluster (see the module docstring)."""

    bindir: Path = field(default_factory=find_bin)
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="dicomnode-pg-")))
    user: str | None = field(default_factory=_server_user)
    port: int = 0
    password: str = field(default_factory=lambda: secrets.token_hex(12))
    started: bool = False

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "run"

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        cmd = list(args)
        if self.user is not None:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=self.root)

    def start(self) -> PostgresServer:
        """initdb, then start on a free port (a few ports are tried: another process may take
        one between our probe and the server's bind).

        Raises
        ------
        RuntimeError
            initdb or the server failed; the message holds their output.
        """
        self.socket_dir.mkdir()
        if self.user is not None:  # the server's user owns the folder (root reads it anyway)
            entry = pwd.getpwnam(self.user)
            for path in (self.root, self.socket_dir):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        out = self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        )
        if out.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{out.stdout}\n{out.stderr}")
        last = ""
        for _ in range(5):
            self.port = free_port()
            options = (
                f"-p {self.port} -k {self.socket_dir} -c listen_addresses=127.0.0.1 "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                "-c max_connections=300 -c shared_buffers=32MB"
            )
            out = self._run(
                str(self.bindir / "pg_ctl"),
                "-D",
                str(self.data),
                "-l",
                str(self.root / "server.log"),
                "-o",
                options,
                "-w",
                "-t",
                "60",
                "start",
            )
            if out.returncode == 0:
                self.started = True
                break
            last = out.stdout + out.stderr + self.log()[-2000:]
        else:
            raise RuntimeError(f"PostgreSQL did not start:\n{last}")
        self.admin(
            f"CREATE ROLE {ROLE} LOGIN CREATEDB PASSWORD '{self.password}'",
        )
        return self

    def log(self) -> str:
        path = self.root / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def admin(self, sql: str) -> None:
        """Run one statement as the superuser over the Unix socket (autocommit)."""
        import psycopg

        with psycopg.connect(
            host=str(self.socket_dir),
            port=self.port,
            user="postgres",
            dbname="postgres",
            autocommit=True,
        ) as conn:
            conn.execute(sql)  # type: ignore[arg-type]

    def url(self, dbname: str) -> str:
        """The SQLAlchemy URL of ``dbname`` as the node's login role, password included."""
        return f"postgresql+psycopg://{ROLE}:{self.password}@127.0.0.1:{self.port}/{dbname}"

    def create_database(self) -> tuple[str, str]:
        """A fresh database owned by the node's role; return (name, URL)."""
        name = f"t_{secrets.token_hex(6)}"
        self.admin(f"CREATE DATABASE {name} OWNER {ROLE}")
        return name, self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop ``name``, disconnecting whoever is still connected (a test's leftover node)."""
        self.admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def stop(self) -> None:
        """Stop the server at once and remove its folder (safe to call twice)."""
        if self.started:
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop")
            self.started = False
            deadline = time.monotonic() + 10
            while (self.data / "postmaster.pid").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        shutil.rmtree(self.root, ignore_errors=True)
