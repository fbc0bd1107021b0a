"""Which job a log line is about: the job id and tenant of the work under way, written on every log record.

Bound where work on one job starts: the job runner at the start of each job's task (serve/jobs/runner.py), the
service once a create knows its job id (serve/jobs/service.py), a stage replica for each stage call
(deployments/compute.py). asyncio tasks and `asyncio.to_thread` copy the context they start in, so whatever a
job's task starts (its heartbeat, its S3 calls in threads, its webhook delivery) logs with that job too.

`JobLogFilter` copies the bound fields onto each record; `install` (called by every replica, deployments/stage.py)
hands this package's log records to the logger whose handlers write the replica's log file, with the filter on
it. No Ray here: the deployments layer names that logger and the record attribute its JSON formatter flattens.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

# the packages whose loggers `install` routes (every `logging.getLogger(__name__)` of this project)
PROJECT_LOGGERS: tuple[str, ...] = ("serve", "deployments")


@dataclass(frozen=True)
class JobLogContext:
    job_id: str
    tenant: str | None = None  # None where the work does not know it (no field is written then)

    def fields(self) -> dict[str, str]:
        out = {"job_id": self.job_id}
        if self.tenant is not None:
            out["tenant"] = self.tenant
        return out


_current: ContextVar[JobLogContext | None] = ContextVar("videogen_job_log_context", default=None)


def current_job() -> JobLogContext | None:
    """The job the code running now works on, if any."""
    return _current.get()


def bind_job(job_id: str, tenant: str | None = None) -> None:
    """Mark the rest of the current context (task) as work on `job_id`: for code that owns its context, e.g.
    a job's own task or one HTTP request. Elsewhere use `job_context`, which undoes it."""
    _current.set(JobLogContext(job_id, tenant))


@contextmanager
def job_context(job_id: str, tenant: str | None = None) -> Iterator[JobLogContext]:
    """Work on `job_id` inside the block; the previous binding (or none) after it."""
    ctx = JobLogContext(job_id, tenant)
    token = _current.set(ctx)
    try:
        yield ctx
    finally:
        _current.reset(token)


class JobLogFilter(logging.Filter):
    """Writes the bound job's `job_id` and `tenant` on every record it sees (never drops one).

    By default as plain record attributes. With `nest_under`, as a dict in that one attribute, merged with what
    the record already carries there (a caller's own `extra` wins): for a formatter that flattens that attribute
    into top-level fields after handler filters ran, so a filter that rewrites or deletes `job_id` (Ray Serve's
    does: it means Ray's own job there) cannot touch ours.
    """

    def __init__(self, nest_under: str | None = None) -> None:
        super().__init__()
        self.nest_under = nest_under

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = _current.get()
        if ctx is None:
            return True
        fields = ctx.fields()
        if self.nest_under is None:
            for key, value in fields.items():
                if key not in record.__dict__:
                    setattr(record, key, value)
            return True
        present = record.__dict__.get(self.nest_under)
        if present is None:
            setattr(record, self.nest_under, fields)
        elif isinstance(present, dict):
            setattr(record, self.nest_under, {**fields, **present})
        return True


class ForwardTo(logging.Handler):
    """Hands each record to the logger `target` (its filters, then its handlers *as they are now*), at the level
    `target` has now: a handler set replaced later (Ray Serve rebuilds its handlers when the deployment's
    `logging_config` changes, without restarting the replica) is still the one written to."""

    def __init__(self, target: logging.Logger) -> None:
        super().__init__(logging.NOTSET)
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= self.target.getEffectiveLevel():
            self.target.handle(record)


def install(into: str, *, nest_under: str | None = None, sources: tuple[str, ...] = PROJECT_LOGGERS) -> None:
    """Route the records of the `sources` loggers (and their children) to the logger named `into`, and put a
    `JobLogFilter` on that logger, so its own records carry the job too. Idempotent (a replica may call it again).

    The sources stop propagating to the root logger (the lines would be written twice, or, at the root's default
    WARNING, INFO lines lost) and pass every level: `into` decides, per record, with its current level.
    """
    target = logging.getLogger(into)
    if not any(isinstance(f, JobLogFilter) for f in target.filters):
        target.addFilter(JobLogFilter(nest_under))
    for name in sources:
        source = logging.getLogger(name)
        if not any(isinstance(h, ForwardTo) and h.target is target for h in source.handlers):
            source.addHandler(ForwardTo(target))
        source.setLevel(logging.DEBUG)
        source.propagate = False
