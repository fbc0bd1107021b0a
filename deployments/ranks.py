"""The other ranks of a Denoiser replica that spans several GPUs (`model.parallel`, serve/stages/parallel.py).

The replica (rank 0) reserves `cfg * ulysses` bundles through Serve's `placement_group_bundles` (deployments/app.py
derives them) and sits in bundle 0; `RankGroup` starts one `DenoiserRank` actor in each other bundle, the way
`ray.llm` places a tensor-parallel engine's workers. Every rank loads the model itself, then all join one
`torch.distributed` group (NCCL on GPU, gloo on CPU; rendezvous at rank 0's address) whose collectives time out after
`parallel.collective_timeout_s`. A request is sent to every worker (Ray carries its inputs: the broadcast) while rank
0 runs the same loop; rank 0 returns the latents, the workers only their memory readings.

Failure: a worker that dies (or fails, or stalls past the timeout) breaks the group for good. The request fails
(the job runner retries the whole chain), the replica says so in every `check_health` and leaves: it exits its
process, so Serve replaces it at once instead of routing the retry back to it, and Ray ends the workers it owns
with it. No rank is left waiting on a collective: gloo and NCCL fail a collective whose peer is gone, or at the
timeout.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import threading
import time
from typing import Any

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def memory_readings(reset_peak: bool = True) -> dict[str, int]:
    """This process's CUDA allocator readings (allocated, reserved, peak since the last reset); {} on CPU."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    out = {"allocated": torch.cuda.memory_allocated(), "reserved": torch.cuda.memory_reserved(),
           "peak": torch.cuda.max_memory_allocated()}
    if reset_peak:
        torch.cuda.reset_peak_memory_stats()
    return out


def bundle_gpus(bundles: list[dict[str, float]], world: int) -> float:
    """The GPUs a replica of `world` ranks holds: its first `world` bundles' (what its compute time is billed by)."""
    return float(sum(bundle.get("GPU", 0) for bundle in bundles[:world]))


def join_group(stage, plan, rank: int, address: str, port: int) -> None:
    """Make `stage` rank `rank` of the `plan.world_size` ranks meeting at `address:port` (blocks until all have)."""
    from serve.stages.parallel import ParallelContext, init_distributed

    init_distributed(rank, plan.world_size, address, port, backend=plan.backend,
                     timeout_s=plan.collective_timeout_s, device=str(stage.device))
    stage.join(ParallelContext(plan, device=str(stage.device)))


class RankState:
    """What a rank did last (for health, the metrics and the tests): busy, steps, how the last request ended."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.busy = False
        self.steps = 0
        self.last_outcome = "none"  # "completed", "cancelled before step k of n", or the error's type
        self.requests = 0

    def as_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "busy": self.busy, "steps": self.steps, "last_outcome": self.last_outcome,
                "requests": self.requests, "pid": os.getpid()}


def run_rank(stage, state: RankState, emb, params, *, image=None, should_cancel=None, on_step=None) -> Any:
    """One rank's part of a request: the stage's loop, its outcome kept in `state`."""
    from serve.stages.denoising import DenoisingCancelled

    state.busy, state.steps = True, 0
    state.requests += 1

    def counted(step: int, total: int) -> None:
        state.steps = step
        if on_step is not None:
            on_step(step, total)

    try:
        out = stage.denoise(emb, params, on_step=counted, should_cancel=should_cancel, image=image)
        state.last_outcome = "completed"
        return out
    except DenoisingCancelled as exc:
        state.last_outcome = str(exc)
        raise
    except BaseException as exc:
        state.last_outcome = type(exc).__name__
        raise
    finally:
        state.busy = False


class DenoiserRank:
    """Rank r > 0 of a multi-GPU Denoiser replica: a Ray actor in bundle r of the replica's placement group."""

    def __init__(self, args: dict[str, Any], rank: int) -> None:
        from serve.config import ModelAppArgs
        from serve.stages.denoising import DenoisingStage
        from serve.stages.loading import load_stage

        logging.basicConfig(level=logging.INFO)
        self._args = ModelAppArgs.model_validate(args)
        self._model = self._args.model
        self._rank = rank
        self._state = RankState(rank)
        self._stage = load_stage(DenoisingStage, self._args, accel=self._model.accel)

    def join(self, address: str, port: int) -> dict[str, Any]:
        """Join the replica's process group (blocks until every rank has)."""
        join_group(self._stage, self._model.parallel, self._rank, address, port)
        return self._stage.parallel.describe()

    def warmup(self, shapes: list[tuple[int, int, int]], steps: int, without_cfg: bool) -> dict[str, float]:
        return self._stage.warmup(shapes, steps=steps, without_cfg=without_cfg)

    def denoise(self, emb, params, image=None) -> dict[str, Any]:
        """This rank's part of the request rank 0 runs (rank 0 decides cancellation: nothing to pass here)."""
        run_rank(self._stage, self._state, emb, params, image=image)
        return {"rank": self._rank, "memory": memory_readings()}

    def state(self) -> dict[str, Any]:
        return self._state.as_dict()

    def ping(self) -> int:
        return self._rank


class RankGroup:
    """Rank 0's side: the worker actors, the process group, one request on all ranks, and the broken flag."""

    def __init__(self, stage, args: dict[str, Any], plan) -> None:
        self.stage = stage
        self.plan = plan
        self.state = RankState(0)
        self.workers: list[Any] = []
        self.broken: str | None = None  # why the group cannot compute any more
        self.memory: dict[int, dict[str, int]] = {}
        self.gpus = 0.0  # every rank's, once started
        self._args = args

    def start(self) -> None:
        """Start the workers in bundles 1..N-1 of this replica's placement group and form the group (blocking)."""
        import ray
        from ray.util.placement_group import get_current_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        pg = get_current_placement_group()
        world = self.plan.world_size
        if pg is None or len(pg.bundle_specs) < world:
            raise RuntimeError(
                f"model.parallel needs {world} ranks but this replica has "
                f"{'no placement group' if pg is None else f'{len(pg.bundle_specs)} bundles'}: give the Denoiser "
                f"placement_group_bundles of {world} bundles (deployments/app.py derives them from the model entry)")
        self.gpus = bundle_gpus(pg.bundle_specs, world)
        actor = ray.remote(DenoiserRank)
        context = ray.get_runtime_context()
        for rank in range(1, world):
            spec = dict(pg.bundle_specs[rank])
            options: dict[str, Any] = {
                "num_cpus": spec.pop("CPU", 0), "num_gpus": spec.pop("GPU", 0), "resources": spec or None,
                "scheduling_strategy": PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank),
                "name": f"{context.get_actor_name() or 'denoiser'}-rank{rank}", "namespace": context.namespace,
                "max_restarts": 0, "max_concurrency": 2,  # denoise beside state/ping
            }
            if options["resources"] is None:
                options.pop("resources")
            self.workers.append(actor.options(**options).remote(self._args, rank))
        timeout = self.plan.start_timeout_s
        # every worker has loaded its model before the rendezvous, whose own timeout is a collective's
        ray.get([w.ping.remote() for w in self.workers], timeout=timeout)
        address, port = ray.util.get_node_ip_address(), free_port()
        joined = [w.join.remote(address, port) for w in self.workers]
        join_group(self.stage, self.plan, 0, address, port)
        ray.get(joined, timeout=timeout)
        log.info("denoiser: %d ranks joined (cfg %d x ulysses %d) at %s:%d", world, self.plan.cfg,
                 self.plan.ulysses, address, port)

    def warmup(self, shapes, steps: int, without_cfg: bool) -> dict[str, float]:
        import ray

        refs = [w.warmup.remote(shapes, steps, without_cfg) for w in self.workers]
        out = self.stage.warmup(shapes, steps=steps, without_cfg=without_cfg)
        ray.get(refs, timeout=self.plan.start_timeout_s)
        return out

    async def denoise(self, emb, params, *, image=None, on_step=None, should_cancel=None, on_cancel=None) -> Any:
        """One request on every rank; rank 0's latents. A rank that fails breaks the group (see the module).
        `on_cancel` is called when the caller goes away (it makes `should_cancel` true: every rank stops at the
        next step, and this returns only when they all have)."""
        if self.broken:
            raise RuntimeError(f"the denoiser's rank group is broken ({self.broken}); the replica is being replaced")
        refs = [w.denoise.remote(emb, params, image) for w in self.workers]
        mine = asyncio.ensure_future(asyncio.to_thread(
            run_rank, self.stage, self.state, emb, params, image=image, should_cancel=should_cancel,
            on_step=on_step))
        others = [asyncio.ensure_future(r) for r in refs]
        everyone = [mine, *others]
        try:
            # a worker that fails first must not leave rank 0 waiting in a collective until the timeout
            done, _ = await asyncio.wait(everyone, return_when=asyncio.FIRST_EXCEPTION)
            self._raise_failure([f.exception() if f in done else None for f in everyone])
            outcomes = await asyncio.gather(*everyone, return_exceptions=True)
        except asyncio.CancelledError:
            if on_cancel is not None:
                on_cancel()
            await asyncio.gather(*everyone, return_exceptions=True)
            raise
        self._raise_failure(outcomes)
        if isinstance(outcomes[0], BaseException):  # cancelled, on every rank alike
            raise outcomes[0]
        self.memory = {r["rank"]: r["memory"] for r in outcomes[1:]}
        return outcomes[0]

    def _raise_failure(self, outcomes: list) -> None:
        """Break the group and raise on the first rank's failure that is not the request's cancellation."""
        from serve.stages.denoising import DenoisingCancelled

        for rank, exc in enumerate(outcomes):
            if isinstance(exc, BaseException) and not isinstance(exc, DenoisingCancelled):
                self.fail(f"rank {rank}: {type(exc).__name__}")
                raise exc

    def fail(self, why: str) -> None:
        """The group is broken for good: say so, and leave so that Serve starts a whole new replica."""
        if self.broken:
            return
        self.broken = why
        log.error("denoiser: the rank group is broken (%s); this replica exits so that Serve replaces it", why)
        threading.Thread(target=_exit_soon, daemon=True, name="denoiser-exit").start()

    async def check(self) -> None:
        """`check_health`: every worker answers (a dead one breaks the group)."""
        import ray

        if self.broken:
            raise RuntimeError(f"the denoiser's rank group is broken: {self.broken}")
        try:
            await asyncio.wait_for(asyncio.gather(*[w.ping.remote() for w in self.workers]), timeout=10)
        except (ray.exceptions.RayActorError, asyncio.TimeoutError) as exc:
            self.fail(f"a worker rank does not answer: {type(exc).__name__}")
            raise RuntimeError(f"the denoiser's rank group is broken: {self.broken}") from None

    async def states(self) -> list[dict[str, Any]]:
        others = await asyncio.gather(*[w.state.remote() for w in self.workers], return_exceptions=True)
        return [self.state.as_dict(), *[o if isinstance(o, dict) else {"error": type(o).__name__} for o in others]]


def _exit_soon(delay_s: float = 1.0) -> None:
    """Exit the replica's process after the failing call has answered (its error, not a dead actor, reaches the
    caller first); the worker actors it owns end with it."""
    time.sleep(delay_s)
    logging.shutdown()
    os._exit(1)
