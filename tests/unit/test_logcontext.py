"""Log lines say which job they are about (serve/logcontext.py), as Ray Serve writes them.

Ray's own formatter and Serve's own replica handler chain (`configure_component_logger`, a JSON file in a
temporary directory) are used as they are: no cluster. Tests put loggers back as they found them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import logging.handlers
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ray._common.formatters import JSONFormatter

from deployments.compute import stage_call
from serve.jobs.record import new_job_id
from serve.logcontext import (
    ForwardTo,
    JobLogContext,
    JobLogFilter,
    bind_job,
    current_job,
    install,
    job_context,
)
from serve.stages.stage import TEXT_ENCODER
from serve.stages.types import GenerationRequest
from serve.storage import Storage
from tests.params import example_params

EXTRA = "ray_serve_extra_fields"  # Ray's flattened extra-fields attribute (pinned to Ray's constant below)


class Lines(logging.Handler):
    """Formats every record it gets with Ray's JSON formatter, parsed back."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(JSONFormatter())
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))


@pytest.fixture
def restore_loggers(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Loggers this module changes come back as they were (handlers, filters, level, propagation)."""
    from ray.serve._private import logging_utils

    # with RAY_SERVE_LOG_TO_STDERR=0 in the environment Serve would also take over print/stdout/stderr
    monkeypatch.setattr(logging_utils, "RAY_SERVE_LOG_TO_STDERR", True)
    names = ["ray.serve", "serve", "deployments"]
    saved = {n: (list(lg.handlers), list(lg.filters), lg.level, lg.propagate)
             for n in names for lg in [logging.getLogger(n)]}
    yield
    for n, (handlers, filters, level, propagate) in saved.items():
        lg = logging.getLogger(n)
        for h in lg.handlers:
            if h not in handlers:
                h.close()
        lg.handlers[:], lg.filters[:] = handlers, filters
        lg.setLevel(level)
        lg.propagate = propagate


def private_logger(name: str, *filters: logging.Filter) -> tuple[logging.Logger, Lines]:
    logger = logging.getLogger(f"videogen.test.{name}")
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    lines = Lines()
    for f in filters:
        lines.addFilter(f)
    logger.addHandler(lines)
    return logger, lines


# ---- the filter with Ray's JSON formatter -------------------------------------------------------------------


@pytest.mark.parametrize("nest_under", [None, EXTRA])
def test_a_line_logged_for_a_job_carries_its_id_and_tenant_and_others_none(nest_under: str | None) -> None:
    logger, lines = private_logger(f"filter-{nest_under}", JobLogFilter(nest_under))
    job_id = new_job_id()
    logger.info("before")
    with job_context(job_id, "acme"):
        logger.info("working on %s", job_id)
    logger.info("after")
    before, during, after = lines.lines
    assert (during["message"], during["job_id"], during["tenant"]) == (f"working on {job_id}", job_id, "acme")
    for line in (before, after):
        assert "job_id" not in line and "tenant" not in line, line
        assert EXTRA not in line  # nothing empty is written either


def test_a_callers_own_extra_fields_stay_and_win() -> None:
    logger, lines = private_logger("extra", JobLogFilter(EXTRA))
    with job_context(new_job_id(), "acme"):
        logger.info("x", extra={EXTRA: {"status_code": 503, "tenant": "explicit"}})
    [line] = lines.lines
    assert line["status_code"] == 503 and line["tenant"] == "explicit" and line["job_id"].startswith("video_")


def test_work_without_a_tenant_writes_the_job_id_only() -> None:
    logger, lines = private_logger("no-tenant", JobLogFilter(EXTRA))
    with job_context("video_abc"):
        logger.info("stage call")
    [line] = lines.lines
    assert line["job_id"] == "video_abc" and "tenant" not in line


def test_the_binding_follows_tasks_and_threads_it_starts_but_not_siblings() -> None:
    seen: dict[str, Any] = {}

    async def job_task() -> None:
        bind_job("video_1", "acme")
        seen["thread"] = await asyncio.to_thread(current_job)
        seen["child"] = await asyncio.create_task(asyncio.sleep(0, result=current_job()))

    async def sibling() -> None:
        await asyncio.sleep(0.01)
        seen["sibling"] = current_job()

    async def main() -> None:
        await asyncio.gather(job_task(), sibling())
        seen["after"] = current_job()

    asyncio.run(main())
    assert seen["thread"] == seen["child"] and seen["thread"].fields() == {"job_id": "video_1", "tenant": "acme"}
    assert seen["sibling"] is None and seen["after"] is None


# ---- routed through Ray Serve's replica logger --------------------------------------------------------------


def serve_replica_logger(logs_dir: Path) -> None:
    """Ray Serve's own replica logging (what a replica sets up from its deployment's logging_config): JSON file."""
    from ray.serve._private.common import ServeComponentType
    from ray.serve._private.logging_utils import configure_component_logger
    from ray.serve.schema import LoggingConfig

    configure_component_logger(component_name="videogen_Ingress", component_id="r1",
                               logging_config=LoggingConfig(encoding="JSON", logs_dir=str(logs_dir)),
                               component_type=ServeComponentType.REPLICA, max_bytes=10**6, backup_count=1)
    # in a replica, Ray's core context filter writes Ray's job id as `job_id` (Serve deletes it again); outside Ray
    # it writes nothing, so do what it does, first, as it does
    [memory] = [h for h in logging.getLogger("ray.serve").handlers if isinstance(h, logging.handlers.MemoryHandler)]

    class RayCoreJobId(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            record.job_id = "02000000"
            return True

    memory.filters.insert(0, RayCoreJobId())


def file_lines(logs_dir: Path) -> list[dict[str, Any]]:
    for h in logging.getLogger("ray.serve").handlers:
        h.flush()
    [path] = logs_dir.glob("replica_videogen_Ingress_r1.log")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_serves_json_replica_log_carries_the_job_and_tenant(tmp_path: Path, restore_loggers: None) -> None:
    from ray.serve._private.constants import SERVE_LOG_EXTRA_FIELDS, SERVE_LOGGER_NAME

    assert (SERVE_LOGGER_NAME, SERVE_LOG_EXTRA_FIELDS) == ("ray.serve", EXTRA)
    serve_replica_logger(tmp_path)
    install(SERVE_LOGGER_NAME, nest_under=SERVE_LOG_EXTRA_FIELDS, sources=("deployments",))
    ours = logging.getLogger("deployments.test_runner")  # a child of a routed package, as every module's logger
    job_id = new_job_id()
    with job_context(job_id, "acme"):
        ours.info("job %s attempt 1 started", job_id)
        logging.getLogger(SERVE_LOGGER_NAME).info("Serve's own line")
    ours.info("between jobs")
    ours.debug("below the replica's level")
    during, serves, outside = file_lines(tmp_path)
    for line in (during, serves):
        assert (line["job_id"], line["tenant"]) == (job_id, "acme"), line
        assert line["replica"] == "r1" and line["deployment"] == "videogen_Ingress"  # Serve's own fields too
    assert during["message"] == f"job {job_id} attempt 1 started" and during["levelname"] == "INFO"
    assert outside["message"] == "between jobs" and "job_id" not in outside and "tenant" not in outside


def test_plain_attributes_would_lose_the_job_id_in_serves_json_handler(tmp_path: Path,
                                                                     restore_loggers: None) -> None:
    # why the fields go nested: Serve's handler overwrites `job_id` with Ray's and then deletes it
    serve_replica_logger(tmp_path)
    install("ray.serve", nest_under=None, sources=("deployments",))
    with job_context(new_job_id(), "acme"):
        logging.getLogger("deployments.x").info("plain")
    [line] = file_lines(tmp_path)
    assert "job_id" not in line and line["tenant"] == "acme"


def test_a_logging_config_change_rebuilds_serves_handlers_and_lines_still_arrive(tmp_path: Path,
                                                                                restore_loggers: None) -> None:
    serve_replica_logger(tmp_path / "before")
    install("ray.serve", nest_under=EXTRA, sources=("deployments",))
    serve_replica_logger(tmp_path / "after")  # Serve reconfigures a running replica's logger this way
    with job_context("video_x", "acme"):
        logging.getLogger("deployments.x").info("after the change")
    [line] = file_lines(tmp_path / "after")
    assert (line["message"], line["job_id"]) == ("after the change", "video_x")


def test_install_is_idempotent_and_keeps_lines_off_the_root_logger(restore_loggers: None) -> None:
    from deployments.stage import route_logs_to_serve

    route_logs_to_serve()
    route_logs_to_serve()  # a replica may be built twice in one process
    serve_logger = logging.getLogger("ray.serve")
    assert [f.nest_under for f in serve_logger.filters if isinstance(f, JobLogFilter)] == [EXTRA]
    for name in ("serve", "deployments"):
        lg = logging.getLogger(name)
        assert [h.target for h in lg.handlers if isinstance(h, ForwardTo)] == [serve_logger]
        assert lg.propagate is False


# ---- stage replicas ------------------------------------------------------------------------------------------


def test_a_stage_calls_lines_carry_the_job_of_its_request() -> None:
    logger, lines = private_logger("stage", JobLogFilter(EXTRA))

    class Replica:
        @stage_call(TEXT_ENCODER)
        async def encode(self, req: GenerationRequest) -> None:
            logger.info("encoding")
            await asyncio.to_thread(logger.info, "in the thread")
            raise RuntimeError("CUDA error on 10.0.0.7")

    job_id = new_job_id()
    req = GenerationRequest(job_id=job_id, prompt="a cat", negative_prompt=None,
                            params=example_params().sampling, model="m", tenant="acme")
    with pytest.raises(Exception, match="RuntimeError"):
        asyncio.run(Replica().encode(req))
    logger.info("next")
    *during, after = lines.lines
    assert [line["message"] for line in during] == ["encoding", "in the thread"]
    assert all((line["job_id"], line["tenant"]) == (job_id, "acme") for line in during) and "job_id" not in after



def test_a_successful_stage_call_leaves_one_line_of_its_job() -> None:
    """Serve's own access line is written after the call, outside its context: the stage writes its own."""
    lines = Lines()
    lines.addFilter(JobLogFilter(EXTRA))
    compute = logging.getLogger("deployments.compute")
    compute.addHandler(lines)
    level, compute.level = compute.level, logging.INFO

    class Replica:
        @stage_call(TEXT_ENCODER)
        async def encode(self, req: GenerationRequest) -> str:
            return "embeddings"

    job_id = new_job_id()
    req = GenerationRequest(job_id=job_id, prompt="a cat", negative_prompt=None,
                            params=example_params().sampling, model="m", tenant="acme")
    try:
        assert asyncio.run(Replica().encode(req)) == "embeddings"
    finally:
        compute.removeHandler(lines)
        compute.setLevel(level)
    (line,) = lines.lines
    assert line["message"].startswith("TextEncoder done in ") and line["message"].endswith(" ms")
    assert (line["job_id"], line["tenant"]) == (job_id, "acme")


# ---- the create request -------------------------------------------------------------------------------------


def test_the_rest_of_a_create_request_logs_as_its_job(storage: Storage) -> None:
    from serve.api.wire import CreateVideoRequest
    from serve.config import ApiConfig, AppConfig
    from serve.jobs.wiring import build_ingress
    from tests.unit.test_routes import SMALL, WritesVideo

    config = AppConfig(s3=storage.cfg, api=ApiConfig(api_keys=["sk-unit-test"]), keys={"legacy_plan": "enterprise"})
    graph = build_ingress(config, storage=storage, pipeline=WritesVideo(storage), owner="ingress-unit")

    async def main() -> None:
        try:
            assert current_job() is None
            req = CreateVideoRequest(prompt="a cat on a skateboard", **SMALL)
            video = await graph.service.create(req, "acme", request_id="r-1")
            assert current_job() == JobLogContext(video.id, "acme")
            job = await asyncio.to_thread(graph.store.get, video.id)
            assert job is not None and job.request_id == "r-1"
        finally:
            await graph.runner.stop()

    asyncio.run(main())
