"""Scaling on the backlog (issue 14, part 3), without Ray: the demand board every ingress reports to, the stage
deployments' BacklogPolicy over Serve's own AutoscalingContext and wrapper (bounds and delays), and chain slots per
model that follow the capacity the ingress reads (a model at its slots does not hold back another model's jobs)."""

from __future__ import annotations

import asyncio
import time

from ray.serve._private.common import DeploymentID
from ray.serve.autoscaling_policy import _apply_autoscaling_config
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from deployments.autoscaling import (
    DEFAULT_LIMITER,
    BacklogPolicy,
    backlog_replicas,
    model_of,
)
from serve.config.limits import LimitsConfig
from serve.jobs.demand import DemandBoard
from serve.jobs.record import JobRecord, new_job_id
from serve.jobs.runner import JobRunner
from serve.jobs.store import JobStore
from serve.storage import Storage
from tests.clock import Clock
from tests.params import example_params
from tests.unit.test_runner import jobs_config, until_ended


def make_job(store: JobStore, model: str) -> JobRecord:
    now = time.time()
    return store.create(JobRecord(id=new_job_id(int(now * 1000)), created_at=int(now), model=model, prompt="p",
                                  params=example_params(num_inference_steps=4, seed=1), total_steps=4))


def test_the_board_sums_fresh_reports_and_drops_a_silent_replica() -> None:
    clock = Clock(1000.0)
    board = DemandBoard(clock=clock)
    board.report("ingress-a", {"m": (10, 2), "other": (1, 0)}, stale_s=3)
    board.report("ingress-b", {"m": (5, 1)}, stale_s=3)
    d = board.demand("m")
    assert (d.queued, d.running, d.reporters, d.jobs) == (15, 3, 2, 18)
    board.report("ingress-a", {"m": (4, 2)}, stale_s=3)  # a report replaces the replica's previous one
    assert board.demand("m").jobs == 12
    clock.advance(2)
    board.report("ingress-b", {"m": (0, 1)}, stale_s=3)
    clock.advance(2)  # ingress-a silent for 4 s > 3 s: it died; its jobs are someone else's to report
    assert board.demand("m").as_dict() == {"queued": 0, "running": 1, "reporters": 1}
    board.forget("ingress-b")
    assert board.demand("m").reporters == 0


def ctx(current: int, requests: float, config: AutoscalingConfig, app: str = "model-m",
        state: dict | None = None) -> AutoscalingContext:
    return AutoscalingContext(
        deployment_id=DeploymentID(name="Denoiser", app_name=app), deployment_name="Denoiser", app_name=app,
        current_num_replicas=current, target_num_replicas=current, running_replicas=[],
        total_num_requests=requests, total_queued_requests=0, aggregated_metrics={}, raw_metrics={},
        capacity_adjusted_min_replicas=config.min_replicas, capacity_adjusted_max_replicas=config.max_replicas,
        policy_state=state or {}, last_scale_up_time=None, last_scale_down_time=None, current_time=time.time(),
        config=config)


def test_the_policy_asks_for_the_backlog_within_serves_bounds_and_delays() -> None:
    demand = {"queued": 100, "running": 2, "reporters": 1}
    config = AutoscalingConfig(min_replicas=1, max_replicas=8, target_ongoing_requests=1, upscale_delay_s=0,
                               downscale_delay_s=0)
    policy = _apply_autoscaling_config(BacklogPolicy(source=lambda model: demand if model == "m" else None))
    # two requests at the Denoiser's one replica: Serve's own policy wants 2; the 102 jobs ask for max_replicas
    replicas, _ = policy(ctx(1, 2, config))
    assert replicas == 8
    demand.update(queued=3, running=1)
    assert policy(ctx(8, 1, config))[0] == 4
    # target_ongoing_requests is the jobs one replica is sized for: 2 per replica halves the ask
    assert policy(ctx(1, 1, config.model_copy(update={"target_ongoing_requests": 2})))[0] == 2
    demand.update(queued=0, running=0)  # the backlog is gone: back to min_replicas
    assert policy(ctx(4, 0, config))[0] == 1
    # downscale_delay_s holds a scale-down back, as it does for Serve's own policy
    slow = config.model_copy(update={"downscale_delay_s": 60})
    replicas, state = policy(ctx(4, 0, slow))
    assert replicas == 4
    # scaled to zero (min_replicas 0) and no request at any handle: a queued job still asks for a replica, at once
    zero = config.model_copy(update={"min_replicas": 0, "upscale_delay_s": 60})
    demand.update(queued=1, running=0)
    assert policy(ctx(0, 0, zero))[0] == 1
    # another application's deployment (no model), or no demand at all: Serve's own policy
    assert policy(ctx(1, 3, config, app="videogen"))[0] == 3
    assert BacklogPolicy(source=lambda m: None)(ctx(1, 3, config)) == (3.0, {})


def test_the_policy_reads_without_blocking_and_names_the_shipped_limiter() -> None:
    assert DEFAULT_LIMITER == (LimitsConfig().actor_name, LimitsConfig().actor_namespace)
    assert model_of("model-cogvideox-5b") == "cogvideox-5b" and model_of("videogen") is None
    assert [backlog_replicas(j, 1) for j in (0, 1, 5)] == [0, 1, 5] and backlog_replicas(5, 2) == 3


def test_chain_slots_are_per_model_and_follow_the_capacity(storage: Storage) -> None:
    store = JobStore(storage, retention_s=3600)

    class Gate:
        def __init__(self) -> None:
            self.go = asyncio.Event()
            self.started: list[str] = []

        async def run(self, job):
            from tests.unit.test_runner import Succeeds

            self.started.append(job.model)
            await self.go.wait()
            return await Succeeds().run(job)

    async def main() -> None:
        pipeline = Gate()
        runner = JobRunner(store, pipeline, jobs_config(max_concurrent_per_replica=64), owner="ingress-a")
        runner.set_capacity({"big": 1, "small": 2})
        try:
            big = [make_job(store, model="big") for _ in range(4)]
            small = [make_job(store, model="small") for _ in range(2)]
            for job in big + small:
                runner.submit(job.id, job.tenant, job.model)
            for _ in range(100):
                if len(pipeline.started) >= 3:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)
            # one slot for "big": its backlog waits without holding "small" back
            assert sorted(pipeline.started) == ["big", "small", "small"]
            assert runner.demand() == {"big": (3, 1), "small": (0, 2)}
            runner.set_capacity({"big": 3, "small": 2})  # more Denoisers came up: more of "big" start at once
            for _ in range(100):
                if pipeline.started.count("big") >= 3:
                    break
                await asyncio.sleep(0.01)
            assert pipeline.started.count("big") == 3 and runner.demand()["big"] == (1, 3)
            pipeline.go.set()
            for job in big + small:
                assert (await until_ended(store, job.id, runner)).status == "completed"
            assert runner.demand() == {}
        finally:
            await runner.stop()

    asyncio.run(main())


def test_a_chain_gives_its_slot_back_when_the_stages_are_done_with_it(storage: Storage) -> None:
    """The terminal write, bill and webhook need no stage: the next queued job starts while they run."""
    store = JobStore(storage, retention_s=3600)

    class Records:
        def __init__(self) -> None:
            self.started: list[str] = []

        async def run(self, job):
            from tests.unit.test_runner import Succeeds

            self.started.append(job.id)
            return await Succeeds().run(job)

    async def main() -> None:
        release = asyncio.Event()
        ending: list[str] = []

        async def slow_end(job: JobRecord) -> None:  # e.g. S3 slow to take the usage record
            ending.append(job.id)
            await release.wait()

        pipeline = Records()
        runner = JobRunner(store, pipeline, jobs_config(), owner="ingress-a", on_finished=slow_end)
        runner.set_capacity({"m": 1})
        try:
            first, second = make_job(store, "m"), make_job(store, "m")
            runner.submit(first.id, first.tenant, first.model)
            runner.submit(second.id, second.tenant, second.model)
            for _ in range(300):
                if len(pipeline.started) == 2 and ending:
                    break
                await asyncio.sleep(0.01)
            # the second chain started while the first job's end-of-job hook is still held (never released yet)
            assert pipeline.started == [first.id, second.id] and ending[0] == first.id
            release.set()
            for job in (first, second):
                assert (await until_ended(store, job.id, runner)).status == "completed"
        finally:
            release.set()
            await runner.stop()

    asyncio.run(main())
