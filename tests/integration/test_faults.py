"""Jobs are never stuck: a Denoiser replica killed mid-job, a cancelled job, a whole-app restart."""

from __future__ import annotations

import time

import httpx
import pytest
import ray

from tests.integration.test_api_e2e import TERMINAL, api, wait_for

pytestmark = pytest.mark.integration

# heavy enough that the tiny model spends seconds in the denoising loop (one S3 progress write per step)
# (~35 ms a step on 2 cores: about 7 s of denoising, plenty of time to act mid-loop)
LONG = {"prompt": "slow pan over a city at night", "size": "128x96", "num_frames": 49,
        "num_inference_steps": 200, "seed": 3}


def kill_replica(deployment: str, app: str | None = None) -> str:
    """Kill one replica of `deployment` (of the default model's application for a stage, else the ingress's)."""
    app = app or ("videogen" if deployment == "Ingress" else "model-cogvideox-tiny-2b")
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if f"{app}#{deployment}#" in actor["name"]:
            ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
            return actor["name"]
    raise AssertionError(f"no {deployment} replica found")


def in_denoising(v: dict) -> bool:
    return v["status"] == "in_progress" and v.get("stage") == "denoising" and (v.get("step") or 0) >= 2


def test_killing_the_denoiser_mid_job_retries_and_completes(cluster):
    with api(cluster) as http:
        job_id = http.post("/v1/videos", json=LONG).json()["id"]
        running = wait_for(http, job_id, in_denoising)
        assert running["step"] < running["total_steps"], "the job finished denoising before the kill"
        kill_replica("Denoiser")
        done = wait_for(http, job_id, lambda v: v["status"] in TERMINAL, timeout_s=240, interval_s=0.5)
    if done["status"] == "completed":
        assert done["attempts"] >= 2, done  # the killed attempt was seen and retried as a whole chain
    else:
        assert done["status"] == "failed" and done["error"]["message"], done
        assert "Denoiser" in done["error"]["message"]


def test_killing_the_ingress_mid_job_lets_a_new_replica_reclaim_and_finish(cluster):
    with api(cluster) as http:
        job_id = http.post("/v1/videos", json=LONG).json()["id"]
        wait_for(http, job_id, in_denoising)
    kill_replica("Ingress")  # the replica that holds the lease: nobody renews it any more
    deadline = time.time() + 240
    record = {}
    while time.time() < deadline:
        try:
            with api(cluster) as http:
                r = http.get(f"/v1/videos/{job_id}")
            if r.status_code == 200 and r.json()["status"] in TERMINAL:
                record = cluster.storage.get_json(cluster.storage.key("jobs", f"{job_id}.json"))
                break
        except httpx.HTTPError:
            pass  # the proxy has no ingress replica until Serve restarts it
        time.sleep(0.5)
    assert record.get("status") == "completed", record
    assert record["attempts"] >= 2  # the new ingress replica reran the chain it could not resume


def test_delete_cancels_the_denoising_loop_and_frees_the_replica(cluster):
    with api(cluster) as http:
        job_id = http.post("/v1/videos", json=LONG).json()["id"]
        running = wait_for(http, job_id, in_denoising, timeout_s=240)
        r = http.delete(f"/v1/videos/{job_id}")
        assert r.status_code == 200 and r.json() == {"id": job_id, "object": "video.deleted", "deleted": True}
        # gone for clients at once, record and objects removed
        assert http.get(f"/v1/videos/{job_id}").status_code == 404
        deadline = time.time() + 60
        storage = cluster.storage
        while storage.exists(storage.key("jobs", f"{job_id}.json")) and time.time() < deadline:
            time.sleep(0.2)
        assert not storage.exists(storage.key("jobs", f"{job_id}.json"))
        # the loop stopped: a running loop would keep rewriting progress/<id>.json with higher steps
        def step_now():
            key = storage.key("progress", f"{job_id}.json")
            return storage.get_json(key)["step"] if storage.exists(key) else None

        time.sleep(0.5)
        first = step_now()
        time.sleep(1.5)
        assert step_now() == first, "the Denoiser kept stepping after the delete"
        assert first is None or first < running["total_steps"]
        # and the replica is free: a short job right after completes
        short = http.post("/v1/videos", json={"prompt": "quick", "num_inference_steps": 2}).json()["id"]
        done = wait_for(http, short, lambda v: v["status"] in TERMINAL, timeout_s=120)
        assert done["status"] == "completed"


def test_cancel_stops_the_denoiser_within_a_step_and_the_job_ends_cancelled(cluster):
    storage = cluster.storage
    with api(cluster) as http:
        job_id = http.post("/v1/videos", json=LONG).json()["id"]
        wait_for(http, job_id, in_denoising, timeout_s=240)
        r = http.post(f"/v1/videos/{job_id}/cancel")
        assert r.status_code == 200, r.text
        at_cancel = r.json()["step"]
        done = wait_for(http, job_id, lambda v: v["status"] in TERMINAL, timeout_s=60)
        assert done["status"] == "cancelled" and done["error"]["code"] == "cancelled"
        # stopped at the next step (+1 for the progress write that may trail the loop by a step)
        assert done["step"] <= at_cancel + 2 < done["total_steps"]
        assert not storage.exists(storage.key("videos", f"{job_id}.mp4"))
        # cancelling again is a clear 409, and the Denoiser is free for the next job
        again = http.post(f"/v1/videos/{job_id}/cancel")
        assert again.status_code == 409 and again.json()["error"]["code"] == "invalid_state"
        short = http.post("/v1/videos", json={"prompt": "next", "num_inference_steps": 2}).json()["id"]
        assert wait_for(http, short, lambda v: v["status"] in TERMINAL)["status"] == "completed"


def test_deadline_fails_the_job_and_frees_the_denoiser(cluster):
    with api(cluster) as http:
        job_id = http.post("/v1/videos", json={**LONG, "deadline_seconds": 2}).json()["id"]
        done = wait_for(http, job_id, lambda v: v["status"] in TERMINAL, timeout_s=60)
        assert done["status"] == "failed" and done["error"]["code"] == "deadline_exceeded", done
        short = http.post("/v1/videos", json={"prompt": "after deadline", "num_inference_steps": 2}).json()["id"]
        assert wait_for(http, short, lambda v: v["status"] in TERMINAL)["status"] == "completed"
