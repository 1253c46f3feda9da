"""``/docs`` and ``/ui`` are served with everything they load, from Threadline itself."""

from __future__ import annotations

import re

import httpx

from threadline.ui import ASSETS


def _sources(html: str) -> list[str]:
    """What the page loads: scripts and linked files (not the <noscript> link to the document)."""
    return re.findall(r'<(?:script src|link rel="[a-z]+" href)="([^"]+)"', html)


def test_docs_loads_only_files_served_by_threadline(anon: httpx.Client) -> None:
    page = anon.get("/docs")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    sources = [s for s in _sources(page.text) if not s.startswith("data:")]
    assert any("redoc.standalone.js" in s for s in sources)
    for source in sources:
        assert source.startswith("/"), f"{source} is not served by Threadline"
        assert not source.startswith("//")
        response = anon.get(source)
        assert response.status_code == 200, source
        assert response.headers["cache-control"] == "public, max-age=31536000, immutable"
    assert "<script>" not in page.text  # no inline script
    assert anon.get("/openapi.json").json()["paths"]["/v1/stream/{name}"]["head"]


def test_ui_page_and_its_files(anon: httpx.Client) -> None:
    page = anon.get("/ui")
    assert page.status_code == 200
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp
    assert "unsafe-inline" not in csp
    sources = [s for s in _sources(page.text) if not s.startswith("data:")]
    assert len(sources) == 2
    for source in sources:
        response = anon.get(source)
        assert response.status_code == 200
        assert response.content == ASSETS[source.split("?")[0].removeprefix("/ui/static/")].body


def test_static_files_cache_only_their_current_version(anon: httpx.Client) -> None:
    asset = ASSETS["vendor/redoc/redoc.standalone.js"]
    stale = anon.get("/ui/static/vendor/redoc/redoc.standalone.js?v=old")
    assert stale.status_code == 200
    assert stale.headers["cache-control"] == "no-cache"
    assert stale.headers["content-type"].startswith("text/javascript")
    assert stale.headers["etag"] == f'"{asset.digest}"'
    missing = anon.get("/ui/static/nope.js")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "route_not_found"
    assert anon.get("/ui/static/../../config.py").status_code == 404
