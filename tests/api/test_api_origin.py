"""Browser-origin requests cannot change state through the Client API (issue 11, #13).

A web page can make a browser POST to the Client API (a form post needs no CORS preflight); the
browser marks such requests with ``Origin``. They are refused with a 403 JSend ``fail`` and change
nothing; reads, curl's ``-d`` (a form content type) and the CLI's requests keep working.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from harness import STATUS_2, STATUS_3, RunningCoordinator, activation_manifest_bytes


def _manifest_body() -> dict[str, str]:
    return {"manifest": base64.b64encode(activation_manifest_bytes()).decode()}


@pytest.mark.parametrize("origin", ["https://evil.example", "null", "https://localhost:4433"])
def test_state_changing_request_with_origin_is_refused(coordinator: RunningCoordinator, origin: str) -> None:
    with coordinator.client() as c:
        r = c.post("/api/v2/manifest", json=_manifest_body(), headers={"Origin": origin})
        assert r.status_code == 403
        doc = r.json()
        assert doc["status"] == "fail"
        assert "Origin" in doc["message"] and "browser" in doc["message"]
        # nothing changed
        assert c.get("/api/v2/status").json()["data"]["message"] == STATUS_2
        # the v1 path and a form content type are refused the same way
        r = c.post(
            "/manifest",
            content=activation_manifest_bytes(),
            headers={"Origin": origin, "Content-Type": "application/x-www-form-urlencoded"},
        )
        assert r.status_code == 403
        assert c.get("/api/v2/status").json()["data"]["message"] == STATUS_2


def test_reads_with_origin_still_work(deployed: RunningCoordinator) -> None:
    with deployed.client() as c:
        for path in ("/api/v2/status", "/api/v2/manifest", "/api/v2/quote", "/status"):
            r = c.get(path, headers={"Origin": "https://evil.example"})
            assert r.status_code == 200, path


@pytest.mark.parametrize(
    "path", ["/api/v2/recover", "/api/v2/update", "/api/v2/secrets", "/api/v2/update-cancel"]
)
def test_every_post_route_checks_origin(deployed: RunningCoordinator, path: str) -> None:
    with deployed.client() as c:
        r = c.post(path, content=b"{}", headers={"Origin": "https://evil.example"})
    assert r.status_code == 403
    assert r.json()["status"] == "fail"


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_curl_form_post_without_origin_still_sets_the_manifest(
    coordinator: RunningCoordinator, tmp_path: Path
) -> None:
    body = tmp_path / "body.json"
    body.write_text(json.dumps(_manifest_body()))
    proc = subprocess.run(
        [
            "curl", "-sS", "--noproxy", "*", "--cacert", str(coordinator.root_pem_path),
            "-d", f"@{body}", f"{coordinator.client_url}/api/v2/manifest",
        ],
        capture_output=True, timeout=60, check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert json.loads(proc.stdout)["status"] == "success"
    with coordinator.client() as c:
        assert c.get("/api/v2/status").json()["data"]["message"] == STATUS_3
