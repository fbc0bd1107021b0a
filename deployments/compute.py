"""Blocking stage work (torch) run off the replica's event loop, and never abandoned mid-GPU-call; and the
typed errors a stage call leaves its replica with.

A cancelled request (job cancelled or deleted, caller gone) must not release the stage's lock while its
thread is still computing: the next request would then share the GPU with it. So the caller waits for
the thread to end (after `on_cancel`, e.g. the Denoiser's stop-at-next-step flag) before re-raising.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from serve.logcontext import job_context
from serve.stages.stage import Stage, StageError, StageFailed, StageRefused
from serve.stages.types import GenerationRequest

T = TypeVar("T")
log = logging.getLogger(__name__)


async def run_to_end(fn: Callable[..., T], *args: Any, on_cancel: Callable[[], None] | None = None,
                     **kwargs: Any) -> T:
    work = asyncio.ensure_future(asyncio.to_thread(fn, *args, **kwargs))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        if on_cancel is not None:
            on_cancel()
        await asyncio.gather(work, return_exceptions=True)
        raise


def stage_call(stage: Stage):
    """Decorate a stage replica's request method: its failures leave the replica as typed stage errors.

    A `ValueError` is the request being invalid for the model (`StageRefused`, never retried); anything else
    is `StageFailed`, named by its type only (the full error, which may name hosts and ids, is logged here).
    Ray keeps the type across the call: its task error subclasses the exception it carries. Every line logged
    during the call (in its threads too) carries the job id of its `GenerationRequest` (serve/logcontext.py).
    """

    def wrap(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
        @functools.wraps(method)
        async def call(*args: Any, **kwargs: Any) -> T:
            req = next((a for a in (*args, *kwargs.values()) if isinstance(a, GenerationRequest)), None)
            # the request names its job: every line logged for this call, in its threads too, says which one
            with job_context(req.job_id, req.tenant) if req is not None else contextlib.nullcontext():
                started = time.perf_counter()
                try:
                    out = await method(*args, **kwargs)
                    # one line per call in the job's context: Serve's own access line ("CALL ... OK") is written
                    # after the call returns, outside it, and cannot carry the job
                    log.info("%s done in %.0f ms", stage.deployment, 1000 * (time.perf_counter() - started))
                    return out
                except StageError:
                    raise
                except ValueError as exc:
                    log.warning("%s refused a request: %s", stage.deployment, exc)
                    raise StageRefused(stage.deployment,
                                       str(exc).splitlines()[0][:300] if str(exc) else "invalid") from None
                except Exception as exc:
                    log.exception("%s failed", stage.deployment)
                    raise StageFailed(stage.deployment, type(exc).__name__) from None

        return call

    return wrap
