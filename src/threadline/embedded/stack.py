"""The embedded stack behind ``threadline dev`` and the test suite: Postgres, S3 and ClickHouse.

All three live under one data directory and listen on new free ports on every start; their
data survives restarts. The stack is synchronous on purpose: it runs before any event loop
exists and inside plain pytest fixtures.

Layout::

    <data>/.threadline-data-dir   marker: only a directory carrying it is ever wiped
    <data>/stack.lock             flock held while a launcher runs
    <data>/credentials.json       generated once (0600) and reused
    <data>/postgres/{data,run}    cluster and Unix socket
    <data>/s3/                    SeaweedFS data
    <data>/clickhouse/            chDB data
    <data>/logs/*.log             one log per service
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
import shutil
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal, Protocol, get_args

from threadline.embedded.clickhouse import EmbeddedClickHouse
from threadline.embedded.ports import free_port
from threadline.embedded.postgres import EmbeddedPostgres
from threadline.embedded.processes import StackError
from threadline.embedded.seaweedfs import EmbeddedS3, S3Ports

__all__ = ["EmbeddedStack", "ServiceName", "StackEndpoints", "StackError"]

logger = logging.getLogger("threadline.embedded")

ServiceName = Literal["postgres", "s3", "clickhouse"]
SERVICE_NAMES: tuple[ServiceName, ...] = get_args(ServiceName)
MARKER = ".threadline-data-dir"
LOCK_FILE = "stack.lock"
CREDENTIALS_FILE = "credentials.json"
S3_BUCKET = "threadline"
S3_REGION = "us-east-1"


@dataclass(frozen=True)
class StackEndpoints:
    """Where the running services are, with credentials: everything a server needs."""

    database_url: str
    s3_endpoint: str
    s3_bucket: str
    s3_region: str
    s3_access_key_id: str
    s3_secret_access_key: str
    clickhouse_url: str

    def as_env(self) -> dict[str, str]:
        """The ``THREADLINE_*`` variables the settings object reads."""
        return {
            "THREADLINE_DATABASE_URL": self.database_url,
            "THREADLINE_S3_ENDPOINT": self.s3_endpoint,
            "THREADLINE_S3_BUCKET": self.s3_bucket,
            "THREADLINE_S3_REGION": self.s3_region,
            "THREADLINE_S3_ACCESS_KEY_ID": self.s3_access_key_id,
            "THREADLINE_S3_SECRET_ACCESS_KEY": self.s3_secret_access_key,
            "THREADLINE_CLICKHOUSE_URL": self.clickhouse_url,
        }


@dataclass(frozen=True)
class _Credentials:
    postgres_password: str
    s3_access_key_id: str
    s3_secret_access_key: str
    clickhouse_password: str

    @classmethod
    def generate(cls) -> _Credentials:
        return cls(
            postgres_password=secrets.token_urlsafe(24),
            s3_access_key_id="TL" + secrets.token_hex(9).upper(),
            s3_secret_access_key=secrets.token_urlsafe(30),
            clickhouse_password=secrets.token_urlsafe(24),
        )


class _Service(Protocol):
    @property
    def pid(self) -> int | None: ...
    @property
    def exit_code(self) -> int | None: ...
    def clean_up_after_exit(self) -> None: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def kill(self) -> None: ...


class EmbeddedStack:
    """Postgres, S3 and ClickHouse under ``data_dir``; ``fresh=True`` wipes it first."""

    def __init__(
        self, data_dir: Path, *, fresh: bool = False, postgres_settings: Mapping[str, str] | None = None
    ) -> None:
        self.data_dir = Path(data_dir).expanduser().absolute()
        self.fresh = fresh
        # Overrides of the embedded Postgres settings (tests: a tiny max_slot_wal_keep_size).
        self.postgres_settings = dict(postgres_settings or {})
        self._services: dict[ServiceName, _Service] = {}
        self._endpoints: StackEndpoints | None = None
        self._lock_fd: int | None = None
        # Re-entrant: a signal handler that calls stop() while start() runs must not deadlock.
        self._mutex = threading.RLock()

    # -- public API ---------------------------------------------------------------------------

    @property
    def endpoints(self) -> StackEndpoints:
        if self._endpoints is None:
            raise StackError("the embedded stack is not running; call start() first")
        return self._endpoints

    @property
    def logs_dir(self) -> Path:
        return self.data_dir / "logs"

    def start(self) -> StackEndpoints:
        """Start all services (in parallel), wait until each answers, return the endpoints."""
        with self._mutex:
            if self._endpoints is not None:
                return self._endpoints
            self._open_data_dir()
            try:
                self._endpoints = self._start_services()
            except BaseException:
                self._stop_services()
                self._release_lock()
                raise
            return self._endpoints

    def stop(self) -> None:
        """Stop every service (reverse start order) and release the data dir. Idempotent.

        To stop on a signal while start() may be running, raise from the handler instead
        (KeyboardInterrupt, SystemExit): start() stops whatever it started on any exception.
        """
        with self._mutex:
            self._stop_services()
            self._endpoints = None
            self._release_lock()

    def stop_service(self, name: ServiceName, *, kill: bool = False) -> None:
        """Stop one service (``kill=True``: SIGKILL, a crash) — for fault tests."""
        service = self._service(name)
        if kill:
            service.kill()
        else:
            service.stop()

    def start_service(self, name: ServiceName) -> None:
        """Start a stopped service again on the same ports, so clients' endpoints stay valid."""
        service = self._service(name)
        if service.pid is None:
            service.start()

    def exited_services(self) -> dict[ServiceName, int]:
        """The services whose process died on its own since it started, with its exit code
        (negative: killed by that signal). Polling reaps them, so none stays a zombie."""
        with self._mutex:
            return {
                name: code
                for name, service in self._services.items()
                if (code := service.exit_code) is not None
            }

    def restart_service(self, name: ServiceName) -> None:
        """Start a service that died on its own again, on the same ports, after removing what
        its death left behind (orphaned children, a stale lock file). Raises StackError."""
        with self._mutex:
            if self._endpoints is None:
                raise StackError("the embedded stack is not running")
            service = self._service(name)
            if service.pid is not None:
                return
            service.clean_up_after_exit()
            service.start()

    def service_pids(self) -> dict[str, int]:
        """The pid of each running service (Postgres: the postmaster)."""
        return {name: pid for name, service in self._services.items() if (pid := service.pid) is not None}

    def __enter__(self) -> EmbeddedStack:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<EmbeddedStack {self.data_dir} running={self._endpoints is not None}>"

    # -- data directory -------------------------------------------------------------------------

    def _open_data_dir(self) -> None:
        """Validate, lock, optionally wipe, and mark the data directory."""
        d = self.data_dir
        if d.exists() and not d.is_dir():
            raise StackError(f"data dir {d} is a file, not a directory; choose another path")
        try:
            foreign = (
                d.is_dir() and not (d / MARKER).exists() and any(p.name != LOCK_FILE for p in d.iterdir())
            )
            d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StackError(
                f"cannot create data dir {d}: {exc.strerror or exc}; choose another path"
            ) from exc
        if foreign:
            action = "wipe" if self.fresh else "use"
            raise StackError(
                f"refusing to {action} {d}: it is not empty and is not a Threadline data dir "
                f"(no {MARKER} file); choose an empty or new directory"
            )
        if not os.access(d, os.W_OK | os.X_OK):
            raise StackError(f"data dir {d} is not writable by this user; choose another path")
        self._acquire_lock()
        try:
            if self.fresh:
                self._wipe()
                self.fresh = False  # a restart of this object keeps what the first start made
            (d / MARKER).write_text("Threadline embedded stack data. `threadline dev --fresh` deletes it.\n")
            self.logs_dir.mkdir(exist_ok=True)
        except OSError as exc:
            self._release_lock()
            raise StackError(f"cannot prepare data dir {d}: {exc}") from exc

    def _acquire_lock(self) -> None:
        path = self.data_dir / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StackError(f"cannot create {path}: {exc.strerror}; is the data dir writable?") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StackError(
                f"data dir {self.data_dir} is in use by another threadline process (pid {holder}); "
                f"stop it, or use another data dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the only descriptor releases the flock
            self._lock_fd = None

    def _wipe(self) -> None:
        logger.info("wiping data dir %s", self.data_dir)
        for entry in self.data_dir.iterdir():
            if entry.name == LOCK_FILE:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    def _credentials(self) -> _Credentials:
        """Load the credentials, or generate them on first start.

        Postgres bakes its password into the cluster at initdb, so a lost credentials file
        with an existing cluster is an error rather than a reason to generate new ones.
        """
        path = self.data_dir / CREDENTIALS_FILE
        if path.exists():
            try:
                return _Credentials(**json.loads(path.read_text()))
            except (OSError, ValueError, TypeError) as exc:
                raise StackError(
                    f"{path} is unreadable or damaged ({exc}); restore it or start with --fresh"
                ) from exc
        if (self.data_dir / "postgres" / "data" / "PG_VERSION").exists():
            raise StackError(
                f"{path} is missing but {self.data_dir} holds a Postgres cluster whose password it stored; "
                f"restore the file or start with --fresh (this deletes the data)"
            )
        creds = _Credentials.generate()
        tmp = path.with_suffix(".tmp")
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(creds.__dict__, f, indent=2)
        os.replace(tmp, path)
        return creds

    # -- services -------------------------------------------------------------------------------

    def _start_services(self) -> StackEndpoints:
        creds = self._credentials()
        d, logs = self.data_dir, self.logs_dir
        pg_port = free_port()
        s3_ports = S3Ports.allocate(exclude={pg_port})
        ch_port = free_port(exclude={pg_port, *s3_ports.all()})
        postgres = EmbeddedPostgres(
            d / "postgres",
            port=pg_port,
            password=creds.postgres_password,
            log_path=logs / "postgres.log",
            settings=self.postgres_settings,
        )
        s3 = EmbeddedS3(
            d / "s3",
            ports=s3_ports,
            access_key_id=creds.s3_access_key_id,
            secret_access_key=creds.s3_secret_access_key,
            bucket=S3_BUCKET,
            region=S3_REGION,
            log_path=logs / "s3.log",
        )
        clickhouse = EmbeddedClickHouse(
            d / "clickhouse",
            port=ch_port,
            password=creds.clickhouse_password,
            log_path=logs / "clickhouse.log",
        )
        self._services = {"postgres": postgres, "s3": s3, "clickhouse": clickhouse}
        # Independent services: start them side by side; the slowest (chDB's import) sets the pace.
        errors: list[str] = []
        with ThreadPoolExecutor(
            max_workers=len(self._services), thread_name_prefix="threadline-start"
        ) as pool:
            futures = {name: pool.submit(service.start) for name, service in self._services.items()}
            for name, future in futures.items():
                exc = future.exception()
                if isinstance(exc, StackError):
                    errors.append(str(exc))
                elif exc is not None:
                    errors.append(f"{name} failed to start: {exc!r}")
        if errors:
            raise StackError("\n".join(errors))
        logger.info("embedded stack running in %s", d)
        return StackEndpoints(
            database_url=postgres.url,
            s3_endpoint=s3.endpoint,
            s3_bucket=S3_BUCKET,
            s3_region=S3_REGION,
            s3_access_key_id=creds.s3_access_key_id,
            s3_secret_access_key=creds.s3_secret_access_key,
            clickhouse_url=clickhouse.url,
        )

    def _stop_services(self) -> None:
        for name in reversed(SERVICE_NAMES):
            service = self._services.get(name)
            if service is None:
                continue
            try:
                service.stop()
            except Exception:
                logger.exception("error while stopping %s", name)
        self._services = {}

    def _service(self, name: ServiceName) -> _Service:
        if name not in SERVICE_NAMES:
            raise ValueError(f"unknown service {name!r}; expected one of {', '.join(SERVICE_NAMES)}")
        service = self._services.get(name)
        if service is None:
            raise StackError("the embedded stack is not running; call start() first")
        return service
