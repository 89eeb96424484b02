"""A throw-away PostgreSQL cluster for one test: its own data directory and port, so a test can
stop and restart PostgreSQL without touching the shared server on 5432.

`PgCluster.create()` runs `initdb` into a fresh directory under /tmp owned by the `postgres`
user (trust authentication, no fsync: nothing here must survive a crash of the machine), and
`start()` listens on 127.0.0.1:<free port> with its Unix socket in that directory. `stop()`
(`pg_ctl stop -m fast` by default) and `start()` again restart it; `destroy()` stops it if
it runs and removes the directory, and the `pg_cluster` fixture always calls it.

The binaries are found in /usr/lib/postgresql/<newest>/bin (or $KLEIS_PG_BIN) and run as the
`postgres` user through `runuser` when the tests run as root (PostgreSQL refuses to run as
root). Without them the fixture skips, unless KLEIS_REQUIRE_PG is set: then it fails.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

OWNER = "postgres"


def pg_bin() -> Path | None:
    """The folder of initdb/pg_ctl/postgres, or None."""
    if os.environ.get("KLEIS_PG_BIN"):
        folder = Path(os.environ["KLEIS_PG_BIN"])
        return folder if (folder / "initdb").is_file() else None
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def unavailable() -> str | None:
    """Why a throw-away cluster cannot be made here, or None."""
    if pg_bin() is None:
        return "initdb not found (install PostgreSQL server binaries or set KLEIS_PG_BIN)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(OWNER)
        except KeyError:
            return f"running as root and there is no {OWNER!r} user to run PostgreSQL as"
        if shutil.which("runuser") is None:
            return "running as root and runuser is not available"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PgCluster:
    """One initdb'd cluster (see the module docstring)."""

    def __init__(self, root: Path, bin_dir: Path):
        self.root = root
        self.data = root / "data"
        self.logfile = root / "postgres.log"
        self.bin = bin_dir
        self.port = free_port()
        self.running = False

    @classmethod
    def create(cls) -> PgCluster:
        bin_dir = pg_bin()
        assert bin_dir is not None, unavailable()
        root = Path(tempfile.mkdtemp(prefix="kleis-pgcluster-"))
        cluster = cls(root, bin_dir)
        try:
            if os.geteuid() == 0:
                shutil.chown(root, OWNER, OWNER)
            cluster._run("initdb", "-D", str(cluster.data), "-A", "trust", "-U", "postgres", "-E", "UTF8",
                         "--no-sync", "--no-instructions")  # fmt: skip
        except BaseException:
            cluster.destroy()
            raise
        return cluster

    def _run(self, tool: str, *args: str, timeout: float = 60) -> str:
        command = [str(self.bin / tool), *args]
        if os.geteuid() == 0 and getpass.getuser() != OWNER:
            command = ["runuser", "-u", OWNER, "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=self.root)
        if done.returncode != 0:
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stderr.strip()}\n{self.log()}")
        return done.stdout

    def log(self, tail: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-tail:])
        return ""

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        """Start (or start again, on the same port) and wait until it accepts connections."""
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.root} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=50"
        )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.logfile), "-o", options, "-w", "-t", "30",
                  "start")  # fmt: skip
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        """`pg_ctl stop -m <mode>` (fast: clients are disconnected, nothing is lost)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "30", "stop")
        self.running = False

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def destroy(self) -> None:
        """Stop it (immediately) if it runs, then remove its directory. Never raises."""
        if self.running or (self.data / "postmaster.pid").exists():
            with contextlib.suppress(Exception):
                self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def pg_cluster():
    """A started throw-away cluster (see the module docstring), destroyed after the test."""
    reason = unavailable()
    if reason:
        if os.environ.get("KLEIS_REQUIRE_PG"):
            pytest.fail(f"a throw-away PostgreSQL cluster is required (KLEIS_REQUIRE_PG): {reason}")
        pytest.skip(f"no throw-away PostgreSQL cluster: {reason}")
    cluster = PgCluster.create()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()
