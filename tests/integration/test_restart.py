"""Job records live in S3: a restart of the whole app still serves finished jobs and finishes queued ones."""

from __future__ import annotations

import pytest

from serve.media.encoding import probe_mp4
from tests.integration.test_api_e2e import TERMINAL, api, wait_for

pytestmark = pytest.mark.integration


def test_app_restart_keeps_serving_jobs(cluster):
    with api(cluster) as http:
        done_id = http.post("/v1/videos", json={"prompt": "before restart", "seed": 5}).json()["id"]
        done = wait_for(http, done_id, lambda v: v["status"] in TERMINAL)
        assert done["status"] == "completed"
        # accepted just before the app goes away: the next app generation must finish it
        pending_id = http.post("/v1/videos", json={"prompt": "survives the restart", "seed": 6}).json()["id"]

    cluster.shutdown_app()
    cluster.deploy()

    with api(cluster) as http:
        again = http.get(f"/v1/videos/{done_id}").json()
        assert again["status"] == "completed" and again["id"] == done_id
        mp4 = http.get(f"/v1/videos/{done_id}/content").content
        assert probe_mp4(mp4)["frames"] == 9
        ids = [v["id"] for v in http.get("/v1/videos", params={"limit": 100}).json()["data"]]
        assert done_id in ids and pending_id in ids
        pending = wait_for(http, pending_id, lambda v: v["status"] in TERMINAL, timeout_s=180)
        assert pending["status"] == "completed", pending
