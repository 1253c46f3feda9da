"""Several worker processes on one port: how ``threadline serve --workers N`` uses every core.

One Python process runs one event loop on one core. N workers each run the whole app (their own
event loop, committer, live hub, connection pool), sharing nothing but Postgres, S3 and ClickHouse,
which already coordinate separate instances: row locks and guarded head updates order appends,
NOTIFY carries commits to every worker's subscribers, one advisory lock elects the replication
leader and another serialises maintenance passes, migrations take a lock and are idempotent.

The supervisor is uvicorn's own (:class:`uvicorn.supervisors.Multiprocess`): it binds the socket
once, spawns the workers with it (the kernel hands each accepted connection to one of them),
pings them, restarts one that dies or hangs, and on SIGTERM/SIGINT sends each worker SIGTERM and
waits. A worker's SIGTERM is uvicorn's graceful shutdown: it stops accepting, in-flight requests
finish and are answered, SSE streams end at once (the client resumes by offset elsewhere), and
the lifespan drains the committer. We add what the product needs on top: our log lines, worker
exits reflected in the exit code, metrics aggregated across workers, and workers that follow a
supervisor killed by ``kill -9`` instead of serving on as orphans.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable

import uvicorn
from starlette.applications import Starlette
from uvicorn.supervisors.multiprocess import Multiprocess

from threadline.config import Settings
from threadline.logs import configure_logging

__all__ = ["AppFactory", "Supervisor", "run_workers", "worker_count"]

logger = logging.getLogger(__name__)

# prometheus_client's switch: when set before it is imported, every worker writes its samples to
# files in this directory and /metrics (any worker) reports all workers together.
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
# A worker answers the supervisor's ping from a thread of its own; on a loaded machine a busy
# loop can hold the GIL for a while, so hanging means silent for this long, not 5 s.
HEALTHCHECK_SECONDS = 30
_PR_SET_PDEATHSIG = 1
_CLEAN_EXITS = frozenset({0, -signal.SIGTERM, -signal.SIGINT})


def worker_count(configured: int) -> int:
    """``0`` means one worker per CPU this process may run on (its affinity mask, which a
    container's cpuset narrows; a CPU quota does not, so set the count there)."""
    if configured > 0:
        return configured
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def _exit_with_parent(parent_pid: int) -> None:
    """Have the kernel send this worker SIGTERM when its supervisor dies (Linux), so a supervisor
    killed outright does not leave workers serving on the port with nobody to restart them."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent_pid:  # the supervisor died before the request was in place
        os.kill(os.getpid(), signal.SIGTERM)


class AppFactory:
    """What each worker process calls to build its app (uvicorn ``factory=True``).

    It travels to the spawned worker by pickling, so it holds only the settings and the
    supervisor's pid; logging is configured here because a spawned process starts with none.
    """

    def __init__(self, settings: Settings, parent_pid: int | None = None) -> None:
        self.settings = settings
        self.parent_pid = parent_pid

    def __call__(self) -> Starlette:
        from threadline.api.app import create_app

        configure_logging(self.settings.log_level, self.settings.log_format)
        if self.parent_pid is not None:
            _exit_with_parent(self.parent_pid)
        return create_app(self.settings)


class Supervisor(Multiprocess):
    """uvicorn's supervisor, plus a ready callback, restart logging and metrics cleanup."""

    def __init__(
        self,
        config: uvicorn.Config,
        sockets: list[socket.socket],
        *,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        self._previous_handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        super().__init__(config, sockets)
        self.on_ready = on_ready
        self.restarts = 0
        self.exit_codes: list[int | None] = []

    def pids(self) -> list[int]:
        return [process.pid for process in self.processes if process.pid is not None]

    def run(self) -> None:
        logger.info("workers starting", extra={"workers": self.processes_num, "supervisor_pid": os.getpid()})
        self.init_processes()
        announced = self.on_ready is None
        try:
            while not self.should_exit.wait(0.5):
                self.handle_signals()
                self.keep_subprocess_alive()
                if not announced and self._all_ready():
                    announced = True
                    logger.info("workers ready", extra={"pids": self.pids()})
                    assert self.on_ready is not None
                    self.on_ready()
            logger.info("workers stopping", extra={"pids": self.pids()})
            self.terminate_all()
            self.join_all()
            self.exit_codes = [process.exitcode for process in self.processes]
            for pid in self.pids():
                _forget_metrics(pid)
            logger.info("workers stopped", extra={"exit_codes": self.exit_codes})
        finally:
            for sig, handler in self._previous_handlers.items():
                signal.signal(sig, handler)

    def _all_ready(self) -> bool:
        return all(process.is_ready(timeout=HEALTHCHECK_SECONDS) for process in self.processes)

    def keep_subprocess_alive(self) -> None:
        before = self.pids()
        super().keep_subprocess_alive()
        for old, new in zip(before, self.pids(), strict=True):
            if old != new:
                self.restarts += 1
                _forget_metrics(old)
                logger.warning("worker died; restarted", extra={"dead_pid": old, "new_pid": new})

    def handle_hup(self) -> None:
        """SIGHUP: uvicorn replaces the workers one by one; forget the retired ones' gauges."""
        before = set(self.pids())
        super().handle_hup()
        for pid in before - set(self.pids()):
            _forget_metrics(pid)


def _forget_metrics(pid: int) -> None:
    """Drop a gone worker's live gauges (leader flag, lag) from the aggregate /metrics."""
    if os.environ.get(METRICS_DIR_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def run_workers(
    settings: Settings,
    workers: int,
    *,
    sock: socket.socket | None = None,
    on_ready: Callable[[int], None] | None = None,
) -> int:
    """Serve on ``settings.host:port`` (or ``sock``) with ``workers`` processes until SIGTERM or
    SIGINT; return the exit status (0 when every worker drained cleanly).

    ``on_ready(port)`` runs once every worker answers requests.
    """
    from threadline.api.app import uvicorn_config

    # Counters sum across workers; a fresh directory per run, so figures start at zero like a
    # single process's would. Set before any worker imports prometheus_client.
    metrics_dir = tempfile.mkdtemp(prefix="threadline-metrics-")
    previous_metrics_dir = os.environ.get(METRICS_DIR_ENV)
    os.environ[METRICS_DIR_ENV] = metrics_dir
    config: uvicorn.Config = uvicorn_config(settings, app=AppFactory(settings, os.getpid()))
    config.workers = workers
    config.timeout_worker_healthcheck = HEALTHCHECK_SECONDS
    listener = sock or config.bind_socket()
    port = int(listener.getsockname()[1])
    supervisor = Supervisor(
        config, [listener], on_ready=(lambda: on_ready(port)) if on_ready is not None else None
    )
    started = time.monotonic()
    try:
        supervisor.run()
    finally:
        listener.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
        if previous_metrics_dir is None:
            os.environ.pop(METRICS_DIR_ENV, None)
        else:
            os.environ[METRICS_DIR_ENV] = previous_metrics_dir
    # uvicorn re-raises the stop signal once its graceful shutdown is done, so a worker that
    # drained ends "killed by SIGTERM/SIGINT"; any other ending is a failure.
    failed = [code for code in supervisor.exit_codes if code not in _CLEAN_EXITS]
    logger.info(
        "supervisor exiting",
        extra={"ran_seconds": round(time.monotonic() - started, 1), "restarts": supervisor.restarts},
    )
    return 1 if failed else 0
