"""The Enhancer on the local cluster (issue 13): twice the tiny model's native size and fps is generated natively,
upscaled and interpolated on the Enhancer's own replica and delivered at exactly that geometry; a request inside the
envelope never reaches the Enhancer (its metrics say so); a killed Enhancer replica costs a retry, not the job;
requests no factor can serve are 400s that leave no job."""

from __future__ import annotations

import json
import re
import time

import httpx
import pytest
import ray

from serve.media.encoding import probe_mp4
from tests.integration.conftest import ENHANCED, ENHANCED_MODEL
from tests.integration.test_api_e2e import TERMINAL, api, wait_for
from tests.integration.test_faults import kill_replica

pytestmark = pytest.mark.integration

APP = f"model-{ENHANCED_MODEL}"
QUICK = {"model": ENHANCED_MODEL, "num_inference_steps": 2, "seed": 9}


def enhancer_calls() -> float:
    """Enhancer calls computed so far, as its replicas export them (Ray's metrics port of each node)."""
    total = 0.0
    pattern = re.compile(r'^ray_videogen_stage_processing_seconds_count\{([^}]*)\} ([0-9.e+]+)$', re.M)
    for node in ray.nodes():
        if not node["Alive"]:
            continue
        text = httpx.get(f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics", timeout=10).text
        total += sum(float(v) for labels, v in pattern.findall(text) if 'deployment="Enhancer"' in labels)
    return total


def settled_enhancer_calls(timeout_s: float = 40) -> float:
    """The count once two exports in a row agree (replicas export every metrics_report_interval_ms)."""
    interval = ray._config.metrics_report_interval_ms() / 1000
    last, deadline = enhancer_calls(), time.time() + timeout_s
    while time.time() < deadline:
        time.sleep(interval + 1)
        now = enhancer_calls()
        if now == last:
            return now
        last = now
    return last


def metadata(cluster, video_id: str) -> dict:
    return json.loads(cluster.storage.get_bytes(cluster.storage.key("videos", f"{video_id}.json")))


def job_keys(cluster) -> list[str]:
    return cluster.storage.list_keys(cluster.storage.key("jobs/"))


def test_twice_the_native_size_and_fps_is_delivered_exactly_and_only_enhanced_jobs_call_the_enhancer(cluster):
    with api(cluster) as http:
        # a request inside the envelope (the native 48x32 at 8 fps) goes VaeDecoder -> S3, never to the Enhancer
        before = settled_enhancer_calls()
        r = http.post("/v1/videos", json={**QUICK, "prompt": "a quiet lake", "num_frames": 9})
        assert r.status_code == 200, r.text
        plain = wait_for(http, r.json()["id"], lambda v: v["status"] in TERMINAL)
        assert plain["status"] == "completed", plain
        assert settled_enhancer_calls() == before  # no call reached it
        assert "enhancer_s" not in metadata(cluster, plain["id"])["timings_s"]

        r = http.post("/v1/videos", json={**QUICK, **ENHANCED, "prompt": "a quiet lake", "num_frames": 17})
        assert r.status_code == 200, r.text
        assert (r.json()["size"], r.json()["fps"], r.json()["num_frames"]) == ("96x64", 16, 17)
        done = wait_for(http, r.json()["id"], lambda v: v["status"] in TERMINAL)
        assert done["status"] == "completed", done
        mp4 = http.get(f"/v1/videos/{done['id']}/content").content
        day = time.strftime("%Y-%m-%d", time.gmtime(done["completed_at"]))
        usage = http.get("/v1/usage", params={"start": day, "end": day}).json()
    probe = probe_mp4(mp4)
    assert (probe["frames"], probe["width"], probe["height"], probe["fps"]) == (17, 96, 64, 16)
    meta = metadata(cluster, done["id"])
    assert meta["geometry"] == {"native": {"frames": 9, "width": 48, "height": 32, "fps": 8},
                                "delivered": {"frames": 17, "width": 96, "height": 64, "fps": 16},
                                "sr_factor": 2, "fps_factor": 2}
    used = meta["computed_with"]["enhancer"]
    assert used["super_resolution"]["factor"] == 2 and used["super_resolution"]["architecture"] == "ESRGAN"
    assert used["interpolation"]["factor"] == 2
    assert used["input"] == {"frames": 9, "height": 32, "width": 48, "bytes": 9 * 32 * 48 * 3}  # VAE -> Enhancer
    assert meta["timings_s"]["enhancer_s"] > 0
    assert usage["totals"]["gpu_seconds"]["enhancer"] > 0  # billed as a stage of its own
    assert settled_enhancer_calls() == before + 1  # the enhanced job, and only it, called the Enhancer


def test_killing_the_enhancer_mid_job_retries_and_completes(cluster):
    with api(cluster) as http:
        # 4x interpolation of 49 frames at 128x128 (64x64 generated): seconds of Enhancer work and upload
        r = http.post("/v1/videos", json={**QUICK, "prompt": "a windmill", "size": "128x128", "fps": 32,
                                          "num_frames": 193})
        assert r.status_code == 200, r.text
        job_id = r.json()["id"]
        wait_for(http, job_id, lambda v: v["status"] == "in_progress" and v.get("stage") in ("enhancing",
                                                                                             "uploading"),
                 interval_s=0.02)
        kill_replica("Enhancer", APP)
        done = wait_for(http, job_id, lambda v: v["status"] in TERMINAL, timeout_s=240)
        assert done["status"] == "completed", done
        mp4 = http.get(f"/v1/videos/{job_id}/content").content
    record = json.loads(cluster.storage.get_bytes(cluster.storage.key("jobs", f"{job_id}.json")))
    assert record["attempts"] >= 2, record
    probe = probe_mp4(mp4)
    assert (probe["frames"], probe["width"], probe["height"], probe["fps"]) == (193, 128, 128, 32)


@pytest.mark.parametrize(("body", "param", "says"), [
    ({"size": "192x128"}, "size", "2x super-resolution"),  # 4x of 48x32: above the x2 weights' factor
    ({"size": "112x64"}, "size", "super-resolution"),  # 112/2 = 56: not a size it generates (multiples of 16)
    ({"fps": 30}, "fps", "[8, 16, 32]"),  # Zhipu's 30 fps: no factor reaches it from 8
    ({"fps": 12}, "fps", "[8, 16, 32]"),
    ({"fps": 16, "num_frames": 18}, "num_frames", "2(N-1)+1"),
])
def test_combinations_no_factor_serves_are_400s_without_a_job(cluster, body, param, says):
    before = job_keys(cluster)
    with api(cluster) as http:
        r = http.post("/v1/videos", json={**QUICK, "prompt": "p", **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and says in err["message"], err
    assert job_keys(cluster) == before


def test_a_model_without_an_enhancer_delivers_only_what_it_generates(cluster):
    before = job_keys(cluster)
    with api(cluster) as http:
        r = http.post("/v1/videos", json={"prompt": "p", "fps": 16})  # the default model: no enhance section
        assert r.status_code == 400 and r.json()["error"]["param"] == "fps", r.text
        assert "delivers fps [8]" in r.json()["error"]["message"]
        models = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
    assert job_keys(cluster) == before
    assert models[ENHANCED_MODEL]["size_factors"] == [2] and models[ENHANCED_MODEL]["fps_factors"] == [2, 4]
    assert models[ENHANCED_MODEL]["deliverable_fps"] == [8, 16, 32]
    assert models["cogvideox-tiny-2b"]["size_factors"] == [] and models["cogvideox-tiny-2b"]["deliverable_fps"] == [8]
