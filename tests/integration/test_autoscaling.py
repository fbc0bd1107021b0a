"""Scaling on the backlog (issue 14, part 3) on the real cluster: the tiny I2V model's Denoiser runs Serve's
autoscaler with deployments.autoscaling:BacklogPolicy (min 1, max 3, upscale at once, downscale after 3 s; see
conftest). With the ingress's in-flight ceiling at 1 chain, Serve's own policy can never see more than one request
at the Denoiser and would keep one replica; the jobs queued behind the ceiling reach the policy through the
limiter actor, so the Denoiser grows to max_replicas, and it shrinks back once the backlog is gone."""

from __future__ import annotations

import base64
import time

from ray.serve.context import _get_global_client

from tests.integration.conftest import I2V_DENOISER_AUTOSCALING, I2V_MODEL
from tests.integration.test_api_e2e import TERMINAL, api
from tests.integration.test_i2v import picture

APP = f"model-{I2V_MODEL}"
JOBS = 12
STEPS = 150  # ~3 s a job here (~0.8 s at 40 steps): a backlog of ~35 s, longer than a new tiny replica takes to start


def denoisers() -> tuple[int, int]:
    """(target, running) replicas of the I2V model's Denoiser, as Serve's controller has them."""
    d = _get_global_client().get_serve_details()["applications"][APP]["deployments"]["Denoiser"]
    return int(d["target_num_replicas"]), sum(1 for r in d["replicas"] if r["state"] == "RUNNING")


def test_a_backlog_grows_the_denoiser_past_the_in_flight_cap_and_it_shrinks_after(cluster):
    ceiling = cluster.config.model_copy(update={"jobs": cluster.config.jobs.model_copy(
        update={"max_concurrent_per_replica": 1})})
    cluster.deploy(cluster.serve_config(ceiling))  # the ingress's user_config only: no replica restarts
    assert denoisers() == (1, 1)
    image = "data:image/png;base64," + base64.b64encode(picture(seed=3)).decode()
    timeline: list[tuple[float, int, int, int]] = []  # (seconds since the first POST, target, running, left)
    try:
        with api(cluster) as http:
            t0 = time.monotonic()
            ids = []
            for i in range(JOBS):
                r = http.post("/v1/videos", json={"prompt": f"tide {i}", "model": I2V_MODEL, "num_frames": 9,
                                                  "fps": 8, "num_inference_steps": STEPS,
                                                  "input_reference": {"image_url": image}})
                assert r.status_code == 200, r.text
                ids.append(r.json()["id"])
            left = set(ids)
            ended_at = None
            deadline = t0 + 240
            while time.monotonic() < deadline:
                for job_id in list(left):
                    v = http.get(f"/v1/videos/{job_id}").json()
                    if v["status"] in TERMINAL:
                        assert v["status"] == "completed", v
                        left.discard(job_id)
                target, running = denoisers()
                timeline.append((round(time.monotonic() - t0, 1), target, running, len(left)))
                if not left and ended_at is None:
                    ended_at = time.monotonic()
                if ended_at is not None and (target, running) == (1, 1):
                    break
                time.sleep(0.5)
    finally:
        cluster.deploy()
    shown = "\n".join(f"t={t:>5}s target={g} running={n} jobs left={j}" for t, g, n, j in timeline)
    assert not left, f"jobs did not end:\n{shown}"
    top = I2V_DENOISER_AUTOSCALING["max_replicas"]
    decided = next((t for t, g, _, _ in timeline if g == top), None)
    ready = next((t for t, _, n, _ in timeline if n >= 2), None)
    # decided within a few seconds of the burst (upscale_delay_s 0; reports every 1 s, read every 0.5 s)
    assert decided is not None and decided <= 10, f"never asked for {top} Denoisers in time:\n{shown}"
    # and a second replica served while jobs were still queued
    assert ready is not None and any(n >= 2 and j > 0 for _, _, n, j in timeline), f"no second replica:\n{shown}"
    # back to one once the backlog is gone (downscale_delay_s 3)
    assert timeline[-1][1:3] == (1, 1), f"the Denoiser did not shrink back:\n{shown}"
    print(f"\nautoscaling timeline (decided at {decided}s, second replica ready at {ready}s):\n{shown}")
