"""Static assets the server ships: the session browser (``/ui``) and the vendored Redoc bundle
behind ``/docs``.

Every file under ``static/`` is read once, at import, and served from memory. Its URL carries a
digest of its content (``?v=…``), so a response to that URL can be cached for a year: a new
release changes the URL, not what an old URL means.
"""

from __future__ import annotations

import hashlib
import mimetypes
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable

__all__ = ["ASSETS", "REDOC_VERSION", "Asset", "asset_url"]

REDOC_VERSION = "2.5.4"

_MEDIA_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".html": "text/html; charset=utf-8",
    ".svg": "image/svg+xml",
    ".txt": "text/plain; charset=utf-8",
    ".md": "text/plain; charset=utf-8",
}


@dataclass(frozen=True, slots=True)
class Asset:
    name: str
    body: bytes
    media_type: str
    digest: str

    @property
    def url(self) -> str:
        return f"/ui/static/{self.name}?v={self.digest}"


def _load() -> dict[str, Asset]:
    assets: dict[str, Asset] = {}
    pending: list[tuple[Traversable, str]] = [(resources.files("threadline.ui").joinpath("static"), "")]
    while pending:
        folder, prefix = pending.pop()
        for entry in folder.iterdir():
            name = f"{prefix}{entry.name}"
            if entry.is_dir():
                pending.append((entry, f"{name}/"))
                continue
            body = entry.read_bytes()
            suffix = "." + entry.name.rsplit(".", 1)[-1]
            media_type = _MEDIA_TYPES.get(suffix) or mimetypes.guess_type(entry.name)[0]
            assets[name] = Asset(
                name, body, media_type or "application/octet-stream", hashlib.sha256(body).hexdigest()[:16]
            )
    return assets


ASSETS: dict[str, Asset] = _load()


def asset_url(name: str) -> str:
    """The cache-busting URL of a shipped file (a KeyError names a file that is not shipped)."""
    return ASSETS[name].url
