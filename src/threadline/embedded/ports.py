"""Free TCP ports for the embedded services.

Ports are drawn at random from below the kernel's ephemeral range: ports inside it are also
handed out as the local end of outgoing connections, so a port found free there can be taken
by the time the service binds it. A port counts as free when a listening socket with
``SO_REUSEADDR`` can take it — what the services do — so TIME_WAIT leftovers of a stopped
service do not block restarting it on the same port.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Collection, Iterable
from pathlib import Path

from threadline.embedded.processes import StackError

__all__ = ["PortInUseError", "ensure_port_free", "free_port", "free_ports"]

DEFAULT_HOST = "127.0.0.1"
_LOWEST = 20000
_ATTEMPTS = 2000


class PortInUseError(StackError):
    """A port the stack must use is taken by another process."""


def _ephemeral_low() -> int:
    try:
        low, _high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low)
    except (OSError, ValueError):
        return 32768


def _can_listen(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            sock.listen(1)
        except OSError:
            return False
        return True


def _candidates(max_offset: int) -> Iterable[int]:
    high = _ephemeral_low() - max_offset
    if high - _LOWEST < 1000:  # odd port range: use the whole space above it
        low, high = _LOWEST, 65536 - max_offset
    else:
        low = _LOWEST
    rng = random.SystemRandom()
    for _ in range(_ATTEMPTS):
        yield rng.randrange(low, high)


def free_ports(
    n: int,
    *,
    host: str = DEFAULT_HOST,
    offsets: Collection[int] = (0,),
    exclude: Collection[int] = (),
) -> list[int]:
    """``n`` distinct ports ``p`` such that every ``p + offset`` is free and distinct.

    ``offsets`` exists for SeaweedFS, whose admin server also listens on admin port + 10000.
    ``exclude`` keeps ports already promised to another service out of the result.
    """
    offs = sorted(set(offsets) | {0})
    taken = set(exclude)
    result: list[int] = []
    for port in _candidates(max(offs)):
        if len(result) == n:
            break
        wanted = [port + off for off in offs]
        if any(p in taken for p in wanted) or not all(_can_listen(host, p) for p in wanted):
            continue
        taken.update(wanted)
        result.append(port)
    if len(result) < n:
        raise StackError(f"could not find {n} free TCP ports on {host}")
    return result


def free_port(*, host: str = DEFAULT_HOST, exclude: Collection[int] = ()) -> int:
    """One free port."""
    return free_ports(1, host=host, exclude=exclude)[0]


def ensure_port_free(host: str, port: int, *, service: str = "the service") -> None:
    """Raise ``PortInUseError`` unless ``port`` can be listened on — before a restart on it."""
    if not _can_listen(host, port):
        raise PortInUseError(
            f"cannot restart {service}: port {host}:{port} is in use by another process; "
            f"stop that process, or restart the whole stack to get new ports"
        )
