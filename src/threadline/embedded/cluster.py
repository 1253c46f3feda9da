"""A local production topology: the embedded stack, N ``threadline serve`` processes and HAProxy.

Behind ``threadline dev --instances N`` (``make cluster``), the cluster tests and
``bench/cluster.py``. Every instance is a separate OS process on its own port, exactly what a
deployment runs, so a ``kill -9`` of one is a real crash: its sockets close, its Postgres
sessions (and the advisory locks they hold) go, and clients behind the balancer reconnect to
the others. The balancer is Debian's ``haproxy`` with ``deploy/haproxy/haproxy.cfg`` rendered
with this run's ports.

Synchronous like the stack it extends: it runs before any event loop and in pytest fixtures.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
import shutil
import signal
import string
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from threadline.embedded.ports import free_ports
from threadline.embedded.processes import ManagedProcess, StackError, http_call, setpriv_prefix
from threadline.embedded.stack import EmbeddedStack, StackEndpoints

__all__ = ["HAPROXY_INSTALL_HINT", "Instance", "LocalCluster", "find_haproxy", "render_haproxy_config"]

logger = logging.getLogger("threadline.embedded")

HOST = "127.0.0.1"
HAPROXY_INSTALL_HINT = "install Debian's haproxy package: apt-get install haproxy"
# In the wheel the template is bundled next to the package; in a checkout it is at deploy/.
_BUNDLED_TEMPLATE = Path(__file__).resolve().parents[1] / "_deploy" / "haproxy.cfg"
_CHECKOUT_TEMPLATE = Path(__file__).resolve().parents[3] / "deploy" / "haproxy" / "haproxy.cfg"
_LEADER_METRIC = re.compile(r"^threadline_replication_leader (\S+)$", re.MULTILINE)


def find_haproxy() -> str:
    """The haproxy binary, or a StackError that says how to install it."""
    found = shutil.which("haproxy") or next(
        (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.access(p, os.X_OK)), None
    )
    if found is None:
        raise StackError(f"the local cluster needs HAProxy as its load balancer; {HAPROXY_INSTALL_HINT}")
    return found


def haproxy_template() -> str:
    for path in (_BUNDLED_TEMPLATE, _CHECKOUT_TEMPLATE):
        if path.is_file():
            return path.read_text()
    raise StackError(f"HAProxy template not found (looked in {_BUNDLED_TEMPLATE} and {_CHECKOUT_TEMPLATE})")


def render_haproxy_config(template: str, *, bind: str, stats_bind: str, servers: Mapping[str, str]) -> str:
    """The template with its placeholders filled: ``servers`` maps a name to ``host:port``."""
    lines = "\n".join(f"    server {name} {address}" for name, address in servers.items())
    return string.Template(template).substitute(bind=bind, stats_bind=stats_bind, servers=lines)


@dataclass
class Instance:
    """One ``threadline serve`` process on its own port."""

    name: str
    port: int
    process: ManagedProcess

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def running(self) -> bool:
        return self.process.running

    def ready(self) -> bool:
        status, _ = http_call(f"{self.url}/readyz", timeout=5)
        return status == 200

    def is_leader(self) -> bool:
        """Whether this instance leads the replication consumer (its ``/metrics`` says so)."""
        status, body = http_call(f"{self.url}/metrics", timeout=5)
        match = _LEADER_METRIC.search(body.decode()) if status == 200 else None
        return match is not None and float(match.group(1)) == 1.0


class LocalCluster:
    """The stack (owned, or one passed in), ``instances`` servers and HAProxy in front of them.

    ``port`` is the balancer's port (0: a free one). ``env`` adds ``THREADLINE_*`` settings for
    every instance. Each instance runs one process (``THREADLINE_WORKERS=1``): the cluster's unit
    of failure is the instance.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        instances: int = 3,
        port: int = 0,
        fresh: bool = False,
        stack: EmbeddedStack | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        if instances < 1:
            raise ValueError("a cluster needs at least one instance")
        self.data_dir = Path(data_dir).expanduser().absolute()
        self._owns_stack = stack is None
        self.stack = stack or EmbeddedStack(self.data_dir, fresh=fresh)
        self.count = instances
        self.port = port
        self.env = dict(env or {})
        self.instances: list[Instance] = []
        self.stats_port = 0
        self._haproxy: ManagedProcess | None = None

    # -- addresses ----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The balancer: where clients connect."""
        return f"http://{HOST}:{self.port}"

    @property
    def stats_url(self) -> str:
        return f"http://{HOST}:{self.stats_port}"

    @property
    def endpoints(self) -> StackEndpoints:
        return self.stack.endpoints

    @property
    def config_path(self) -> Path:
        return self.data_dir / "haproxy" / "haproxy.cfg"

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self, *, timeout: float = 120.0) -> None:
        """Stack, then every instance (ready on /readyz), then the balancer with all of them up."""
        haproxy = find_haproxy()  # before anything starts: a missing balancer fails fast
        try:
            endpoints = self.stack.start()
            wanted = self.count + (0 if self.port else 1) + 1
            ports = free_ports(wanted, host=HOST)
            if not self.port:
                self.port = ports.pop()
            self.stats_port = ports.pop()
            self.instances = [
                Instance(f"tl{i + 1}", port, self._serve_process(f"tl{i + 1}", port, endpoints))
                for i, port in enumerate(ports)
            ]
            for instance in self.instances:
                instance.process.start()
            for instance in self.instances:
                instance.process.wait_ready(instance.ready, timeout)
            self._start_haproxy(haproxy)
            self.wait_balanced({i.name for i in self.instances}, timeout=timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Balancer, instances, then the stack if this cluster started it. Idempotent."""
        if self._haproxy is not None:
            self._haproxy.stop()
        for instance in self.instances:
            instance.process.stop(timeout=20)
        if self._owns_stack:
            self.stack.stop()

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- faults and restarts ------------------------------------------------------------------

    def instance(self, name: str) -> Instance:
        for instance in self.instances:
            if instance.name == name:
                return instance
        raise KeyError(name)

    def kill(self, name: str) -> None:
        """SIGKILL one instance: a crash, no chance to finish anything."""
        self.instance(name).process.kill()

    def stop_instance(self, name: str) -> None:
        """SIGTERM one instance and wait: a graceful stop (in-flight requests finish)."""
        self.instance(name).process.stop(timeout=30)

    def start_instance(self, name: str, *, timeout: float = 120.0) -> None:
        """Start a stopped instance on its old port and wait until the balancer routes to it."""
        instance = self.instance(name)
        if not instance.running:
            instance.process.start()
        instance.process.wait_ready(instance.ready, timeout)
        self.wait_balanced({name}, timeout=timeout)

    def pids(self) -> dict[str, int]:
        """The pid of each running instance and of the balancer (``haproxy``): for CPU sampling."""
        found = {i.name: pid for i in self.instances if i.running and (pid := i.process.pid) is not None}
        if self._haproxy is not None and self._haproxy.running and self._haproxy.pid is not None:
            found["haproxy"] = self._haproxy.pid
        return found

    def leaders(self) -> list[str]:
        """The running instances that say they lead replication (one, once settled)."""
        return [i.name for i in self.instances if i.running and _answers(i.is_leader)]

    # -- the balancer's view ------------------------------------------------------------------

    def server_stats(self) -> dict[str, dict[str, str]]:
        """HAProxy's row for each instance (``status`` UP/DOWN, ``scur`` open connections…)."""
        status, body = http_call(f"{self.stats_url}/stats;csv", timeout=5)
        if status != 200:
            raise StackError(f"HAProxy stats answered {status}")
        rows = csv.DictReader(io.StringIO(body.decode().lstrip("# ")))
        return {
            row["svname"]: row
            for row in rows
            if row["pxname"] == "threadline" and row["svname"] not in ("FRONTEND", "BACKEND")
        }

    def wait_balanced(self, names: set[str], *, timeout: float = 60.0, state: str = "UP") -> None:
        """Wait until HAProxy reports every instance in ``names`` as ``state`` (its health checks)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                stats = self.server_stats()
                if all(stats.get(name, {}).get("status", "").startswith(state) for name in names):
                    return
            except (OSError, StackError):
                stats = {}
            if time.monotonic() > deadline:
                seen = {name: row.get("status") for name, row in stats.items()}
                raise StackError(f"HAProxy did not see {sorted(names)} {state} within {timeout:.0f}s: {seen}")
            time.sleep(0.2)

    # -- internals ----------------------------------------------------------------------------

    def _serve_process(self, name: str, port: int, endpoints: StackEndpoints) -> ManagedProcess:
        env = {
            **os.environ,
            **endpoints.as_env(),
            "THREADLINE_HOST": HOST,
            "THREADLINE_PORT": str(port),
            # One process per instance, also once `serve` runs several workers by default.
            "THREADLINE_WORKERS": "1",
            **self.env,
        }
        argv = [*setpriv_prefix(death_signal=signal.SIGTERM), sys.executable, "-m", "threadline", "serve"]
        return ManagedProcess(name, argv, log_path=self.stack.logs_dir / f"{name}.log", env=env)

    def _start_haproxy(self, binary: str) -> None:
        config = render_haproxy_config(
            haproxy_template(),
            bind=f"{HOST}:{self.port}",
            stats_bind=f"{HOST}:{self.stats_port}",
            servers={i.name: f"{HOST}:{i.port}" for i in self.instances},
        )
        self.config_path.parent.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(config)
        argv = [*setpriv_prefix(death_signal=signal.SIGTERM), binary, "-db", "-f", str(self.config_path)]
        process = ManagedProcess("haproxy", argv, log_path=self.stack.logs_dir / "haproxy.log")
        self._haproxy = process
        process.start()

        def answers() -> bool:
            return http_call(f"{self.stats_url}/stats;csv", timeout=2)[0] == 200

        process.wait_ready(answers, 30)
        logger.info("HAProxy on %s in front of %d instances", self.url, len(self.instances))


def _answers(check: Callable[[], bool]) -> bool:
    """A probe of an instance that may be going away: an unreachable one is simply not it."""
    try:
        return check()
    except OSError:
        return False
