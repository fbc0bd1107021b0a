"""Request ids (serve/api/request_id.py): a create stores the client's `X-Request-ID` (or Serve's, or a new one)
on its job, and every answer says the id, once.

The app runs as in tests/unit/test_routes.py (real VideoService, JobStore and JobRunner on moto S3, a fake stage
chain, httpx's ASGI transport). "Behind Serve" wraps it in Ray Serve's own proxy middleware
(`ray.serve._private.http_util.RequestIdMiddleware`, pure ASGI: no cluster), which stamps and echoes ids.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from starlette.requests import Request

from serve.api.request_id import REQUEST_ID_HEADER, RequestIds, request_id_of, settle
from serve.jobs.record import JobRecord, is_request_id, new_job_id
from serve.storage import Storage
from tests.params import example_params
from tests.unit.test_routes import AUTH, SMALL, Env, run, serving

NEW_ID = re.compile(r"[0-9a-f]{32}")  # what this service makes: uuid4 hex


@asynccontextmanager
async def behind_serve(storage: Storage) -> AsyncIterator[Env]:
    """The app as Serve's HTTP proxy runs it: Ray's RequestIdMiddleware in front."""
    from ray.serve._private.http_util import RequestIdMiddleware

    async with serving(storage) as env:
        app = env.client._transport.app  # type: ignore[attr-defined]
        transport = httpx.ASGITransport(app=RequestIdMiddleware(app))
        async with httpx.AsyncClient(transport=transport, base_url="http://ingress") as client:
            yield Env(client, env.storage, env.store, env.pipeline, env.runner)


async def post(env: Env, headers: dict[str, Any] | None = None, **fields: Any) -> httpx.Response:
    return await env.client.post("/v1/videos", json={"prompt": "a cat on a skateboard", **SMALL, **fields},
                                 headers={**AUTH, **(headers or {})})


def ids_in(r: httpx.Response) -> list[str]:
    return r.headers.get_list(REQUEST_ID_HEADER)


async def stored(env: Env, video_id: str) -> str | None:
    job = await asyncio.to_thread(env.store.get, video_id)
    assert job is not None
    return job.request_id


# ---- the token ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "usable"), [
    ("a", True), ("req-1f2e_3d.4c:5b/6a+=~!", True), ("x" * 128, True),
    ("", False), ("x" * 129, False), ("two words", False), ("tab\there", False), ("line\n", False),
    ("crlf\r\nX-Evil: 1", False), ("caf\u00e9", False), ("\x7f", False),
])
def test_a_request_id_is_1_to_128_visible_ascii_characters(value: str, usable: bool) -> None:
    assert is_request_id(value) is usable
    got = settle(value)
    assert (got == value) is usable
    if not usable:
        assert NEW_ID.fullmatch(got)


def test_without_the_middleware_the_header_is_read_as_it_comes() -> None:
    def request(*headers: tuple[bytes, bytes]) -> Request:
        return Request({"type": "http", "method": "POST", "path": "/", "headers": list(headers)})

    assert request_id_of(request((b"x-request-id", b"from-serve-1"))) == "from-serve-1"
    made = request_id_of(request((b"x-request-id", b"not usable")))
    assert NEW_ID.fullmatch(made)


# ---- stored on the job ----------------------------------------------------------------------------------------


def test_a_clients_request_id_is_stored_on_its_job(storage: Storage) -> None:
    async def main() -> None:
        async with serving(storage) as env:
            r = await post(env, {"X-Request-ID": "client-7f3a"})
            assert r.status_code == 200, r.text
            assert await stored(env, r.json()["id"]) == "client-7f3a"
            assert ids_in(r) == []  # the client knows it; behind Serve its proxy echoes it (below)

    run(main())


def test_without_one_the_job_gets_a_new_id_and_the_answer_names_it(storage: Storage) -> None:
    async def main() -> None:
        async with serving(storage) as env:
            r = await post(env)
            assert r.status_code == 200, r.text
            [answered] = ids_in(r)
            assert NEW_ID.fullmatch(answered)
            assert await stored(env, r.json()["id"]) == answered
            # every answer says it, refusals too (the middleware is outermost)
            for resp in (await env.client.get("/v1/videos"), await env.client.get("/v1/nothing", headers=AUTH),
                         await env.client.get("/healthz"),
                         await env.client.get("/healthz", headers={f"x-h{n}": "v" for n in range(101)})):
                assert resp.status_code in (200, 401, 404, 431), resp.text
                assert len(ids_in(resp)) == 1 and NEW_ID.fullmatch(ids_in(resp)[0]), resp.headers
            r2 = await post(env)
            assert ids_in(r2)[0] != answered

    run(main())


@pytest.mark.parametrize("sent", ["two words", "x" * 129, "caf\u00e9".encode("latin-1")])
def test_an_unusable_request_id_is_not_stored(storage: Storage, sent: str | bytes) -> None:
    async def main() -> None:
        async with serving(storage) as env:
            r = await post(env, {"X-Request-ID": sent})
            assert r.status_code == 200, r.text
            kept = await stored(env, r.json()["id"])
            assert kept is not None and NEW_ID.fullmatch(kept)

    run(main())


def test_an_idempotent_replay_answers_with_the_original_job_and_request_id(storage: Storage) -> None:
    async def main() -> None:
        async with serving(storage) as env:
            first = await post(env, {"X-Request-ID": "first-try", "Idempotency-Key": "k-1"})
            again = await post(env, {"X-Request-ID": "second-try", "Idempotency-Key": "k-1"})
            assert first.status_code == again.status_code == 200, again.text
            assert again.json()["id"] == first.json()["id"]
            assert again.headers["idempotent-replayed"] == "true"
            assert await stored(env, first.json()["id"]) == "first-try"

    run(main())


# ---- behind Serve's proxy -------------------------------------------------------------------------------------


def test_behind_serve_every_answer_has_exactly_one_id_the_one_the_job_keeps(storage: Storage) -> None:
    async def main() -> None:
        async with behind_serve(storage) as env:
            r = await post(env)  # Serve makes the id (a uuid4 string) and the app keeps it
            assert r.status_code == 200, r.text
            [answered] = ids_in(r)
            assert await stored(env, r.json()["id"]) == answered
            r = await post(env, {"X-Request-ID": "client-9c1d"})
            assert ids_in(r) == ["client-9c1d"]
            assert await stored(env, r.json()["id"]) == "client-9c1d"
            for resp in (await env.client.get("/v1/videos"), await env.client.get("/healthz")):
                assert len(ids_in(resp)) == 1, resp.headers

    run(main())


# ---- the record -----------------------------------------------------------------------------------------------


def test_records_written_before_the_field_still_load() -> None:
    job = JobRecord(id=new_job_id(), created_at=1, model="m", prompt="p", params=example_params())
    data = job.model_dump(mode="json")
    del data["request_id"]
    old = JobRecord.model_validate(data)
    assert old.request_id is None
    kept = JobRecord.from_json_bytes(job.model_copy(update={"request_id": "abc"}).to_json_bytes())
    assert kept.request_id == "abc"


def test_the_middleware_leaves_other_scopes_alone() -> None:
    seen: list[dict[str, Any]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(scope)

    asyncio.run(RequestIds(app)({"type": "lifespan"}, None, None))  # type: ignore[arg-type]
    assert seen == [{"type": "lifespan"}]
