"""Child process management for the embedded stack.

Every service runs in its own session (``start_new_session=True``) so that a Ctrl-C in the
terminal reaches only the launcher, which then stops the services in order. When the launcher
dies without cleaning up (SIGKILL, crash), the kernel's parent-death signal takes the services
down: ``setpriv --pdeathsig`` sets it in the child before it execs the service binary.

The parent-death signal fires when the *thread* that forked the child exits, not the process.
Callers start services from short-lived worker threads, so every spawn goes through one
long-lived spawner thread that lives as long as the interpreter.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import queue
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import IO

import psutil

__all__ = [
    "ManagedProcess",
    "ProcessService",
    "StackError",
    "child_env",
    "has_permitted_capability",
    "http_call",
    "log_excerpt",
    "setpriv_prefix",
]

logger = logging.getLogger("threadline.embedded")

_LOG_ROTATE_BYTES = 64 * 1024 * 1024


class StackError(Exception):
    """A failure of the embedded stack, with a message that tells the user what to do."""


def setpriv_prefix(
    *, death_signal: signal.Signals, run_as: str | None = None, traverse_any_dir: bool = False
) -> list[str]:
    """The argv prefix that gives a child a parent-death signal and, as root, a user switch.

    ``traverse_any_dir`` grants the user the ambient CAP_DAC_READ_SEARCH (and nothing else) so
    that it can reach binaries and a data dir below a 0700 parent (``/root``, a ``mktemp -d``
    CI checkout, pytest's tmp).
    Without ``setpriv`` (macOS, minimal images) a non-root child runs as is: the launcher still
    stops it, but it would outlive a launcher killed with SIGKILL.
    """
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        if run_as is not None:
            raise StackError(
                f"running as root needs `setpriv` (util-linux) to start services as the "
                f"unprivileged user {run_as!r}; install util-linux or run as a non-root user"
            )
        return []
    prefix = [setpriv]
    if run_as is not None:
        prefix += [f"--reuid={run_as}", f"--regid={run_as}", "--init-groups"]
        if traverse_any_dir:
            # access(2) drops capabilities for a non-root real uid unless SECURE_NO_SETUID_FIXUP
            # is set, and initdb checks its own binaries with access(): without the securebit a
            # venv below a 0700 checkout fails with "invalid binary". The bounding set keeps the
            # child at exactly this one capability.
            prefix += [
                "--securebits=+no_setuid_fixup",
                "--bounding-set=-all,+dac_read_search",
                "--inh-caps=-all,+dac_read_search",
                "--ambient-caps=+dac_read_search",
            ]
    # setpriv spells signals without the SIG prefix.
    prefix += ["--pdeathsig", death_signal.name.removeprefix("SIG")]
    return prefix


def has_permitted_capability(bit: int) -> bool:
    """Whether this process may grant capability ``bit`` (containers often drop some)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapPrm:"):
                return bool(int(line.split()[1], 16) >> bit & 1)
    except (OSError, ValueError):
        pass
    return False


_SpawnJob = tuple[Callable[[], "subprocess.Popen[bytes]"], "Future[subprocess.Popen[bytes]]"]


class _Spawner:
    """Runs ``Popen`` on one daemon thread that lives until the interpreter exits."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[_SpawnJob] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def spawn(self, make: Callable[[], subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="threadline-spawner", daemon=True)
                self._thread.start()
        future: Future[subprocess.Popen[bytes]] = Future()
        self._queue.put((make, future))
        return future.result(timeout=60)

    def _run(self) -> None:
        while True:
            make, future = self._queue.get()
            try:
                future.set_result(make())
            except BaseException as exc:
                future.set_exception(exc)


_spawner = _Spawner()


def log_excerpt(path: Path, *, offset: int = 0, lines: int = 20, key: re.Pattern[str] | None = None) -> str:
    """The last ``lines`` lines of a log written since ``offset``, for error messages.

    ``key`` picks lines worth showing even when they scrolled out of the tail — e.g. a Go
    fatal message followed by a page of goroutine traces.
    """
    try:
        with path.open("rb") as f:
            f.seek(offset)
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return "(no log output)"
    all_lines = text.splitlines()
    tail = all_lines[-lines:]
    keyed = [line for line in all_lines[:-lines] if key is not None and key.search(line)][-5:]
    if not tail:
        return "(no log output)"
    parts = [*keyed, "..."] if keyed else []
    return "\n".join("    " + line for line in [*parts, *tail])


class ManagedProcess:
    """One service process: started in its own session, logged to a file, stopped for sure."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        log_key: re.Pattern[str] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.log_key = log_key
        self._popen: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._log_offset = 0
        self._stopped = False  # stop() or kill() was called: an exit then is no death to report

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen is not None else None

    @property
    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    @property
    def exit_code(self) -> int | None:
        """The exit code (negative: the signal) once the process has exited on its own, else None.

        Polling reaps it: a dead service must not linger as a zombie whose pid still looks alive
        (Postgres refuses to start while the pid in its lock file exists).
        """
        if self._popen is None or self._stopped:
            return None
        return self._popen.poll()

    def clean_up_after_exit(self, timeout: float = 10.0) -> None:
        """After the leader died on its own: kill what is left of its process group (a killed
        postmaster's backends hold its shared memory until they exit) and wait for it to go."""
        popen = self._popen
        if popen is None or popen.poll() is None:
            return
        deadline = time.monotonic() + timeout
        while True:
            try:
                os.killpg(popen.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                break
            if time.monotonic() >= deadline:
                logger.warning("%s left processes that did not exit within %.0fs", self.name, timeout)
                break
            time.sleep(0.05)
        self._close_log()

    def start(self) -> None:
        if self.running:
            raise StackError(f"{self.name} is already running (pid {self.pid})")
        self._close_log()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if self.log_path.exists() and self.log_path.stat().st_size > _LOG_ROTATE_BYTES:
            self.log_path.replace(self.log_path.with_name(self.log_path.name + ".1"))
        log = self.log_path.open("ab")
        log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting {self.name}\n".encode())
        log.flush()
        self._log = log
        self._log_offset = log.tell()
        logger.debug("starting %s: %s", self.name, " ".join(self.argv))

        def make() -> subprocess.Popen[bytes]:
            return subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
                close_fds=True,
            )

        self._stopped = False
        try:
            self._popen = _spawner.spawn(make)
        except OSError as exc:
            self._close_log()
            raise StackError(f"cannot start {self.name} ({self.argv[0]}): {exc}") from exc

    def log_tail(self, lines: int = 20) -> str:
        """What the process logged since its last start."""
        return log_excerpt(self.log_path, offset=self._log_offset, lines=lines, key=self.log_key)

    def wait_ready(self, check: Callable[[], bool], timeout: float, *, interval: float = 0.05) -> None:
        """Poll ``check`` until it returns True; fail fast if the process exits meanwhile."""
        deadline = time.monotonic() + timeout
        last_error: BaseException | None = None
        while True:
            popen = self._popen
            if popen is None:
                raise StackError(f"{self.name} was not started")
            code = popen.poll()
            if code is not None:
                raise StackError(
                    f"{self.name} exited with code {code} while starting; "
                    f"its log {self.log_path} ends with:\n{self.log_tail()}"
                )
            try:
                if check():
                    return
                last_error = None
            except Exception as exc:
                last_error = exc
            if time.monotonic() >= deadline:
                detail = f" (last check: {last_error})" if last_error is not None else ""
                raise StackError(
                    f"{self.name} did not become ready within {timeout:.0f}s{detail}; "
                    f"its log {self.log_path} ends with:\n{self.log_tail()}"
                )
            time.sleep(interval)

    def stop(
        self, sig: signal.Signals = signal.SIGTERM, timeout: float = 15.0, *, quiet_kill: bool = False
    ) -> None:
        """Signal the process, wait for it, then SIGKILL its whole process group.

        ``quiet_kill`` is for services known to hang in shutdown after their data is safe:
        the SIGKILL after ``timeout`` is then logged at INFO instead of WARNING.

        The group sweep catches children a service leaves behind (Postgres backends are
        children of the postmaster). It runs while the exited leader is still an unreaped
        zombie, so its pid — and the group id — cannot have been reused.
        """
        popen = self._popen
        self._stopped = True
        if popen is None or popen.poll() is not None:
            self._close_log()
            return
        pid = popen.pid
        try:
            descendants = psutil.Process(pid).children(recursive=True)
        except psutil.Error:
            descendants = []
        logger.debug("stopping %s (pid %d) with %s", self.name, pid, sig.name)
        popen.send_signal(sig)
        if not _wait_exited(pid, timeout):
            logger.log(
                logging.INFO if quiet_kill else logging.WARNING,
                "%s did not stop within %.0fs after %s; killing it",
                self.name,
                timeout,
                sig.name,
            )
            popen.kill()
            _wait_exited(pid, 10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        popen.wait(timeout=10)
        if descendants:
            _, alive = psutil.wait_procs(descendants, timeout=5)
            for proc in alive:  # left the group (setsid): kill it directly
                logger.warning("killing leftover %s child process %d", self.name, proc.pid)
                with contextlib.suppress(psutil.Error):
                    proc.kill()
            psutil.wait_procs(alive, timeout=5)
        self._close_log()

    def kill(self) -> None:
        """SIGKILL the process and its descendants — a crash, for fault tests."""
        self.stop(signal.SIGKILL, timeout=10)

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def __repr__(self) -> str:
        return f"<ManagedProcess {self.name} pid={self.pid} running={self.running}>"


class ProcessService:
    """What every embedded service run as one :class:`ManagedProcess` shares: its pid while it
    runs, its exit code once it died on its own, and the clean-up after that death."""

    _process: ManagedProcess | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None and self._process.running else None

    @property
    def exit_code(self) -> int | None:
        """Set once the service's process died on its own (a crash, ``kill -9``)."""
        return self._process.exit_code if self._process is not None else None

    def clean_up_after_exit(self) -> None:
        if self._process is not None:
            self._process.clean_up_after_exit()


def _wait_exited(pid: int, timeout: float) -> bool:
    """Wait for a child to exit without reaping it (``WNOWAIT``); False on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        if info is not None:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


_direct_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # local: never via a proxy


def http_call(
    url: str, *, data: bytes | None = None, auth: tuple[str, str] | None = None, timeout: float = 5.0
) -> tuple[int, bytes]:
    """A tiny HTTP client for readiness probes: status and body, errors included, no logging."""
    request = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with _direct_opener.open(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The launcher's environment minus the variables that would confuse a service."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "THREADLINE_"))}
    if extra:
        env.update(extra)
    return env
