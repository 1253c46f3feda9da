"""The session browser and /docs in a real headless Chromium (Debian's ``chromium``, driven by
``puppeteer-core`` from ``ui-tests/``; both installed by ``.ci/run`` / ``make install``).

pytest makes the data through the API, ``ui-tests/drive.mjs`` drives the browser through it and
reports what the page and the network showed, and the assertions are here. Set
``THREADLINE_UI_SCREENSHOTS=docs/images`` to refresh the screenshots the README shows.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import REPO_ROOT, Tenant, eventually
from threadline.config import Settings

CHROMIUM = "/usr/bin/chromium"
DRIVER = REPO_ROOT / "ui-tests" / "drive.mjs"
RECORDS = 60
_TENANCY = ("--org", "tests", "--project", "tests", "--env", "main")
LIST_SESSIONS = 25


def _offset(index: int) -> str:
    return f"{0:016d}_{index:016d}"


def _ui_link(settings: Settings, base_url: str) -> str:
    """``threadline ui-link`` as a user runs it, against the test stack's Postgres."""
    result = subprocess.run(
        [sys.executable, "-m", "threadline", "ui-link", "--url", base_url, "--ttl", "600", *_TENANCY],
        env={**os.environ, "THREADLINE_DATABASE_URL": settings.database_url},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    link = result.stdout.strip()
    assert link.startswith(f"{base_url}/ui#token="), link
    assert "read-only" in result.stderr
    return link


@pytest.fixture(scope="module")
def browser_ready() -> None:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium fonts-liberation (.ci/run does)")
    if not (REPO_ROOT / "ui-tests" / "node_modules" / "puppeteer-core").is_dir():
        pytest.fail("ui-tests/node_modules is missing: run `make install`")


def test_ui_link_token_reads_but_cannot_write(
    settings: Settings, base_url: str, tenant: Tenant, client: httpx.Client
) -> None:
    link = _ui_link(settings, base_url)
    token = link.split("#token=", 1)[1]
    reader = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    session = client.post("/api/v1/sessions", json={"type": "ui-link-check"}).json()
    assert reader.get("/api/v1/sessions/count").status_code == 200
    assert reader.get(f"/api/v1/sessions/{session['id']}").status_code == 200
    assert reader.post(f"/api/v1/sessions/{session['id']}/close").status_code == 403
    assert reader.post("/api/v1/sessions", json={"type": "x"}).status_code == 403
    assert reader.post(f"/api/v1/sessions/{session['id']}/tokens").status_code == 403


def test_session_browser_in_chromium(
    browser_ready: None,
    settings: Settings,
    base_url: str,
    tenant: Tenant,
    client: httpx.Client,
    tmp_path: Path,
) -> None:
    run = uuid.uuid4().hex[:8]
    list_type = f"ui-list-{run}"
    tag = f"blue-{run}"
    created = []
    lsn = ""
    for i in range(LIST_SESSIONS):
        tags = [tag] if i % 5 == 0 else ["plain"]
        response = client.post(
            "/api/v1/sessions",
            json={
                "type": list_type,
                "tags": tags,
                "taskIdentifier": f"task-{i % 3}",
                "externalId": f"{run}-{i}",
            },
        )
        assert response.status_code == 201
        created.append(response.json()["id"])
        lsn = response.headers["Threadline-Lsn"]
    main = client.post(
        "/api/v1/sessions",
        json={
            "type": f"ui-main-{run}",
            "tags": ["demo"],
            "metadata": {"customer": "acme", "plan": {"tier": 2}},
        },
    ).json()
    appended = client.post(
        f"/realtime/v1/sessions/{main['id']}/out/append",
        json=[{"n": i, "role": "agent", "text": f"record {i}"} for i in range(RECORDS)],
    )
    assert appended.json()["records"] == RECORDS
    fork = client.post(f"/api/v1/sessions/{main['id']}/fork", json={"outOffset": f"{0:016d}_{3:016d}"}).json()
    # The list the browser asks for (without minLsn) must already see every session.
    eventually(
        lambda: (
            client.get("/api/v1/sessions/count", params={"filter[type]": list_type, "minLsn": lsn}).json()[
                "count"
            ]
            == LIST_SESSIONS
        )
    )
    newest_first = list(reversed(created))
    tagged = [sid for i, sid in enumerate(created) if i % 5 == 0][::-1]

    screenshots = Path(os.environ.get("THREADLINE_UI_SCREENSHOTS", tmp_path))
    screenshots.mkdir(parents=True, exist_ok=True)
    plan: dict[str, Any] = {
        "chromium": CHROMIUM,
        "baseUrl": base_url,
        "key": tenant.key,
        "listType": list_type,
        "listIds": newest_first,
        "tag": tag,
        "taggedIds": tagged,
        "sessionId": main["id"],
        "forkId": fork["id"],
        "records": RECORDS,
        "tailTimeout": 2,
        "uiLink": _ui_link(settings, base_url),
        "screenshots": str(screenshots.resolve()),
    }
    node = shutil.which("node")
    assert node is not None
    result = subprocess.run(
        [node, str(DRIVER), json.dumps(plan)], capture_output=True, text=True, timeout=240, cwd=DRIVER.parent
    )
    assert result.stdout, result.stderr
    seen = json.loads(result.stdout)
    assert "failedStep" not in seen, f"browser step failed: {seen.get('failedStep')}\n{seen.get('error')}"
    assert result.returncode == 0, result.stderr
    assert seen["pageErrors"] == []

    # Signed in with the key kept in sessionStorage, never in the URL.
    assert seen["storedCredential"] is True
    assert tenant.key not in seen["signedInUrl"]
    # Filtered list, counts, paging forward and back.
    assert seen["pages"] == [newest_first[:10], newest_first[10:20], newest_first[20:], newest_first[10:20]]
    assert seen["nextDisabledOnLastPage"] is True
    assert seen["taggedRows"] == tagged
    assert f"{LIST_SESSIONS} sessions" in seen["counts"]
    assert seen["listSource"] in ("list source: clickhouse", "list source: postgres")
    assert "replication lag" in seen["lag"]
    # The transcript: paged, pretty JSON, jump to latest and to an offset.
    assert seen["firstPage"] == list(range(50))
    assert json.loads(seen["firstRecordText"]) == {"n": 0, "role": "agent", "text": "record 0"}
    assert "\n" in seen["firstRecordText"]  # pretty-printed
    assert json.loads(seen["metadata"]) == {"customer": "acme", "plan": {"tier": 2}}
    assert seen["latestPage"] == list(range(RECORDS - 50, RECORDS))
    assert seen["jumpFirst"] == 5
    # Live: every record once, in order, across reconnects.
    last = seen["appendedThrough"]
    assert seen["liveIndices"] == list(range(RECORDS - 20, last + 1))
    resumes = [r["lastEventId"] for r in seen["realtimeRequests"] if r.get("lastEventId")]
    assert len(resumes) >= 2
    # Each reconnect resumed exactly after a record the page had shown, never going back.
    resumed_at = [int(value.split("_")[1]) for value in resumes]
    assert resumed_at == sorted(resumed_at)
    assert all(RECORDS - 20 < position <= last + 1 for position in resumed_at)
    assert all("token=" in r["url"] for r in seen["realtimeRequests"])
    assert all(tenant.key not in r["url"] for r in seen["realtimeRequests"])
    assert seen["mintedToken"] is True
    # Closed from the page.
    assert seen["closedStatus"] == "CLOSED"
    assert seen["rootLineage"] == "this session"
    assert seen["forkedFrom"] == f"{main['id']} at out {0:016d}_{3:016d}, in {0:016d}_{0:016d}"
    assert seen["forkParentHref"] == f"#/session/{main['id']}"
    assert seen["forkRootId"] == main["id"]
    assert seen["closeDisabled"] is True
    assert client.get(f"/api/v1/sessions/{main['id']}").json()["status"] == "CLOSED"
    # A phone-sized screen does not scroll sideways.
    assert seen["phoneOverflow"] <= 0
    # The ui-link signs in and leaves no token in the address bar.
    assert seen["linkRows"] > 0
    assert "token" not in seen["linkUrlAfter"]
    # /docs rendered with every other host blocked, from Threadline's own files.
    assert any(path.startswith("/ui/static/vendor/redoc/") for path in seen["docsRequests"])
    assert "/openapi.json" in seen["docsRequests"]
    assert len(seen["docsSections"]) > 10
    assert "Durable Streams" in seen["docsText"]
    assert (screenshots / "ui-sessions.png").stat().st_size > 10_000
    assert (screenshots / "ui-session.png").stat().st_size > 10_000
