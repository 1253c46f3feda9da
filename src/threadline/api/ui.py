"""The session browser's page (``/ui``) and the files it and ``/docs`` load (``/ui/static/…``).

Only serving: the browser talks to the same public API as any client, with the caller's
credential. Files come from memory (:mod:`threadline.ui`); a request whose ``?v=`` matches the
file's digest may be cached for a year.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from threadline.errors import RouteNotFound
from threadline.ui import ASSETS, asset_url

__all__ = ["UI_CSP", "routes"]

_LONG_CACHE = "public, max-age=31536000, immutable"

# The UI is one page of our own script and style: nothing inline, nothing from another host.
UI_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def _page() -> str:
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Threadline sessions</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<link rel="icon" href="data:,">
<link rel="stylesheet" href="{asset_url("ui.css")}">
</head>
<body><div id="app"><noscript>The session browser needs JavaScript.</noscript></div>
<script src="{asset_url("ui.js")}"></script>
</body></html>"""


async def ui_page(request: Request) -> Response:
    return HTMLResponse(
        _page(),
        headers={
            "Content-Security-Policy": UI_CSP,
            "Cache-Control": "no-cache",
            "Referrer-Policy": "no-referrer",
        },
    )


async def static_file(request: Request) -> Response:
    asset = ASSETS.get(request.path_params["name"])
    if asset is None:
        raise RouteNotFound("no such file")
    fresh = request.query_params.get("v") == asset.digest
    return Response(
        asset.body,
        media_type=asset.media_type,
        headers={"Cache-Control": _LONG_CACHE if fresh else "no-cache", "ETag": f'"{asset.digest}"'},
    )


routes = [
    Route("/ui", ui_page, methods=["GET"], name="ui"),
    Route("/ui/static/{name:path}", static_file, methods=["GET"], name="ui_static"),
]
