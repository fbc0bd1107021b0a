"""Step-accurate progress from inside a stage replica, written to the job store's progress side channel.

Writes happen on a background thread so a slow S3 call (botocore retries can block for seconds) never
stalls the denoising loop; when writes fall behind, only the newest step is written. Throttled to one
write per `interval_s` (plus always the last step): a GPU step (>= 0.5 s) is written every time, a fast
CPU loop is not turned into an S3 write per millisecond.
"""

from __future__ import annotations

import threading
import time

from serve.jobs.store import JobStore


class ProgressReporter:
    def __init__(self, store: JobStore, job_id: str, stage: str, interval_s: float, attempt: int) -> None:
        self._store = store
        self._job_id = job_id
        self._stage = stage
        self._interval = interval_s
        self._attempt = attempt
        self._last = float("-inf")
        self._pending: tuple[int, int] | None = None
        self._cond = threading.Condition()
        self._writer: threading.Thread | None = None

    def __call__(self, step: int, total: int) -> None:
        now = time.monotonic()
        if step < total and now - self._last < self._interval:
            return
        self._last = now
        with self._cond:
            self._pending = (step, total)
            if self._writer is None:
                self._writer = threading.Thread(target=self._drain, name=f"progress-{self._job_id}", daemon=True)
                self._writer.start()

    def _drain(self) -> None:
        while True:
            with self._cond:
                if self._pending is None:
                    self._writer = None
                    self._cond.notify_all()
                    return
                step, total = self._pending
                self._pending = None
            # best effort: put_progress logs and returns False on a storage error, never failing the job
            self._store.put_progress(self._job_id, self._stage, step, total, attempt=self._attempt)

    def flush(self, timeout_s: float = 5.0) -> None:
        """Wait until the newest step is written (or `timeout_s` passes)."""
        with self._cond:
            self._cond.wait_for(lambda: self._writer is None, timeout=timeout_s)
