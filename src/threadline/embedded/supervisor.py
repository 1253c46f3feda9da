"""Supervision of the embedded stack under ``threadline dev``: a dead service comes back.

A developer's Postgres, SeaweedFS or chDB sidecar can die under them (the OOM killer, a stray
``kill``). Without supervision the server answers 503 until someone restarts ``threadline dev``,
and a killed postmaster stays an unreaped zombie whose lock file blocks even that. The supervisor
polls the services (which reaps the dead), says which one died and how, and starts it again on
the same ports, so the running server's endpoints stay valid and it recovers on its own.

It runs on its own thread: starting a service blocks for seconds, and the server's event loop
must not.
"""

from __future__ import annotations

import logging
import signal
import threading

from threadline.embedded.processes import StackError
from threadline.embedded.stack import EmbeddedStack, ServiceName

__all__ = ["StackSupervisor", "describe_exit"]

logger = logging.getLogger("threadline.embedded")

POLL_SECONDS = 1.0
MAX_BACKOFF_SECONDS = 30.0


def describe_exit(code: int) -> str:
    """``-9`` → ``"exit code -9 (killed by SIGKILL)"``: the code, and the signal when it was one."""
    if code < 0:
        try:
            return f"exit code {code} (killed by {signal.Signals(-code).name})"
        except ValueError:
            return f"exit code {code} (killed by signal {-code})"
    return f"exit code {code}"


class StackSupervisor:
    """Restarts services of ``stack`` that die; ``stop()`` before stopping the stack."""

    def __init__(self, stack: EmbeddedStack, *, poll_seconds: float = POLL_SECONDS) -> None:
        self._stack = stack
        self._poll_seconds = poll_seconds
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="threadline-supervisor", daemon=True)
        self._failures: dict[ServiceName, int] = {}
        self._retry_at: dict[ServiceName, float] = {}
        self._clock = 0.0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=120)

    def _run(self) -> None:
        while not self._stopping.wait(self._poll_seconds):
            self._clock += self._poll_seconds
            try:
                dead = self._stack.exited_services()
            except StackError:
                return  # the stack is stopping
            for name, code in dead.items():
                if self._stopping.is_set():
                    return
                if self._clock >= self._retry_at.get(name, 0.0):
                    self._restart(name, code)

    def _restart(self, name: ServiceName, code: int) -> None:
        attempt = self._failures.get(name, 0) + 1
        logger.error(
            "embedded %s died (%s); restarting it on the same ports",
            name,
            describe_exit(code),
            extra={"service": name, "exit_code": code, "attempt": attempt},
        )
        try:
            self._stack.restart_service(name)
        except StackError as exc:
            self._failures[name] = attempt
            backoff = min(MAX_BACKOFF_SECONDS, 2.0**attempt)
            self._retry_at[name] = self._clock + backoff
            logger.error(
                "embedded %s did not restart: %s; trying again in %.0f s",
                name,
                exc,
                backoff,
                extra={"service": name, "attempt": attempt},
            )
            return
        self._failures.pop(name, None)
        self._retry_at.pop(name, None)
        logger.warning(
            "embedded %s restarted",
            name,
            extra={"service": name, "pid": self._stack.service_pids().get(name)},
        )
