"""A Denoiser replica of 2 ranks on the local cluster (the session's `cogvideox-tiny-2b-ulysses`: Ulysses over a worker
actor in its placement group, gloo on CPU): a job completes; it computes the one-rank replica's latents; a cancel stops every rank
at the same step; a worker killed mid-job ends the job completed after a retry, on a new replica, and no process of
the broken one is left."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import ray
from ray import serve

from tests.integration.conftest import PARALLEL_MODEL, with_parallel_model
from tests.integration.test_api_e2e import TERMINAL, api, wait_for
from tests.integration.test_faults import in_denoising

pytestmark = pytest.mark.integration

APP = f"model-{PARALLEL_MODEL}"
QUICK = {"prompt": "a lantern over a quiet harbour", "size": "48x32", "num_frames": 9, "num_inference_steps": 4,
         "seed": 21}
# seconds of denoising on 2 cores (two ranks share them), to act mid-loop (a cancel or a kill at step 2 lands within a
# few steps); the killed job's retry runs it whole
LONG = {"prompt": "slow pan over a city at night", "model": PARALLEL_MODEL, "size": "128x96", "num_frames": 49,
        "num_inference_steps": 60, "seed": 3}


@pytest.fixture(scope="module", autouse=True)
def parallel_model(cluster):
    """The parallel model's application beside the session's, for this module's tests; removed afterwards (the
    ingress's catalogue shrinks back: a reconfiguration, no restart of the other applications)."""
    cluster.deploy(cluster.serve_config(with_parallel_model(cluster.config)))
    yield
    cluster.deploy()


def ranks() -> list[dict]:
    return serve.get_deployment_handle("Denoiser", app_name=APP).ranks.remote().result(timeout_s=30)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def workers() -> list[dict]:
    return [a for a in ray.util.list_named_actors(all_namespaces=True)
            if f"{APP}#Denoiser#" in a["name"] and a["name"].endswith("-rank1")]


def test_a_job_on_two_ranks_completes(cluster):
    from serve.media.encoding import probe_mp4

    before = ranks()
    assert len(before) == 2 and [r["rank"] for r in before] == [0, 1]
    assert before[0]["pid"] != before[1]["pid"]  # two processes
    with api(cluster) as http:
        job_id = http.post("/v1/videos", json={**QUICK, "model": PARALLEL_MODEL}).json()["id"]
        done = wait_for(http, job_id, lambda v: v["status"] in TERMINAL)
        assert done["status"] == "completed", done
        video = probe_mp4(http.get(f"/v1/videos/{job_id}/content").content)
    assert (video["frames"], video["width"], video["height"]) == (9, 48, 32)
    after = ranks()
    for b, a in zip(before, after, strict=True):  # both ranks ran the request, to its last step
        assert a["requests"] == b["requests"] + 1 and a["last_outcome"] == "completed" and a["steps"] == 4, a


def test_the_two_rank_replica_gives_the_one_rank_replicas_latents(cluster):
    """The same request through each model's own deployments: the TextEncoder's embeddings to the one-rank Denoiser
    and to the two-rank one give the same latents (to float rounding, as tests/stages/test_parallel_numerics.py).
    (Their decoded videos are not compared: H.264 codes a last-bit change of a noise frame differently.)"""
    from serve.jobs.record import new_job_id
    from serve.stages.types import GenerationRequest, SamplingParams

    params = SamplingParams(num_frames=9, height=32, width=48, num_inference_steps=4, guidance_scale=6.0,
                            use_dynamic_cfg=True, seed=21, fps=8)
    req = GenerationRequest(job_id=new_job_id(), prompt=QUICK["prompt"], negative_prompt="blurry", params=params,
                            model="cogvideox-tiny-2b")
    encoded = serve.get_deployment_handle("TextEncoder", app_name="model-cogvideox-tiny-2b").encode.remote(req)
    encoded = encoded.result(timeout_s=60)
    out = {app: serve.get_deployment_handle("Denoiser", app_name=app).denoise.remote(req, encoded).result(timeout_s=120)
           for app in ("model-cogvideox-tiny-2b", APP)}
    assert out[APP].info["denoiser"]["parallel"] == {"cfg": 1, "ulysses": 2}  # the video's record says how
    assert "parallel" not in out["model-cogvideox-tiny-2b"].info["denoiser"]
    one, two = (out[app].value.latents for app in ("model-cogvideox-tiny-2b", APP))
    assert one.shape == two.shape
    assert float(np.abs(one - two).max()) <= 1e-5


def test_a_cancel_stops_every_rank_at_the_same_step(cluster):
    with api(cluster) as http:
        job_id = http.post("/v1/videos", json=LONG).json()["id"]
        wait_for(http, job_id, in_denoising, timeout_s=120)
        assert http.post(f"/v1/videos/{job_id}/cancel").status_code == 200
        done = wait_for(http, job_id, lambda v: v["status"] in TERMINAL, timeout_s=60)
    assert done["status"] == "cancelled", done
    deadline = time.time() + 30
    while any(r["busy"] for r in ranks()) and time.time() < deadline:
        time.sleep(0.2)
    states = ranks()
    assert not any(r["busy"] for r in states), states  # no rank is left in the loop (or in a collective)
    outcomes = {r["last_outcome"] for r in states}
    assert len(outcomes) == 1 and outcomes.pop().startswith("cancelled before step "), states


def test_killing_a_worker_rank_mid_job_retries_on_a_new_replica_and_leaves_no_process(cluster):
    old = ranks()
    [worker] = workers()
    with api(cluster) as http:
        job_id = http.post("/v1/videos", json=LONG).json()["id"]
        running = wait_for(http, job_id, in_denoising, timeout_s=120)
        ray.kill(ray.get_actor(worker["name"], namespace=worker["namespace"]), no_restart=True)
        done = wait_for(http, job_id, lambda v: v["status"] in TERMINAL, timeout_s=300, interval_s=0.5)
    assert running["step"] < running["total_steps"], "the job finished denoising before the kill"
    assert done["status"] == "completed" and done["attempts"] >= 2, done
    new = ranks()
    assert {r["pid"] for r in new}.isdisjoint(r["pid"] for r in old), (old, new)  # a whole new replica
    deadline = time.time() + 30
    while any(alive(r["pid"]) for r in old) and time.time() < deadline:
        time.sleep(0.5)
    assert not [r for r in old if alive(r["pid"])], old  # neither rank of the broken replica hangs on
    assert len(workers()) == 1  # the new replica's worker only
