"""Blocking stage work (torch) run off the replica's event loop, and never abandoned mid-GPU-call.

A cancelled request (job cancelled or deleted, caller gone) must not release the stage's lock while its
thread is still computing: the next request would then share the GPU with it. So the caller waits for
the thread to end (after `on_cancel`, e.g. the Denoiser's stop-at-next-step flag) before re-raising.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


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
