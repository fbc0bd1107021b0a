"""A property-based fuzz run of the whole documented API against the local cluster, driven by its own
/openapi.json (schemathesis): valid and invalid requests for every operation, bounded in examples and time.

It must find no 5xx and no answer that breaks the document (status, content type, headers, body schema).
Negative cases include requests without the key (schemathesis drops it): those are 401s by design. It runs
as `frugal`, a tenant whose plan caps a request's cost at a 48x32, 9-frame, 4-step video and allows 8 jobs at a
time, so fuzzed creates cannot flood the CPUs with real jobs; whatever it leaves running is cancelled at the end.
"""

from __future__ import annotations

import time
from collections import Counter

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

pytestmark = pytest.mark.integration

EXAMPLES = 100  # per operation and generation mode
BUDGET_S = 180.0  # the whole run; what is left of it when the budget ends is not generated
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]


def test_schemathesis_finds_no_5xx_and_no_answer_outside_the_document(cluster):
    key = cluster.keys["frugal"]
    auth = {"Authorization": f"Bearer {key}"}
    spec = httpx.get(f"{cluster.base}/openapi.json", headers=auth, timeout=30).json()
    schema = schemathesis.openapi.from_dict(spec)
    ran: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    start = time.monotonic()
    def fuzzer(operation, mode):
        @settings(max_examples=EXAMPLES, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck), derandomize=True)
        @given(case=operation.as_strategy(generation_mode=mode))
        def fuzz(case) -> None:
            if time.monotonic() - start > BUDGET_S:
                return
            response = case.call_and_validate(base_url=cluster.base, headers=auth, checks=CHECKS, timeout=60)
            ran[operation.label] += 1
            statuses[response.status_code] += 1

        return fuzz

    for result in schema.get_all_operations():
        for mode in GenerationMode:
            fuzzer(result.ok(), mode)()
    elapsed = time.monotonic() - start
    print(f"\nschemathesis: {sum(ran.values())} requests over {len(ran)} operations in {elapsed:.0f} s; "
          f"statuses {dict(sorted(statuses.items()))}")
    for label, n in sorted(ran.items()):
        print(f"  {n:4d}  {label}")
    assert len(ran) == len(list(schema.get_all_operations())), "the budget ended before every operation ran"
    assert not any(s >= 500 for s in statuses)
    # fuzzed creates that were admitted: cancel what still runs so the next tests get the CPUs
    with httpx.Client(base_url=cluster.base, headers=auth, timeout=60) as http:
        for video in http.get("/v1/videos", params={"limit": 100}).json()["data"]:
            if video["status"] in ("queued", "in_progress"):
                http.post(f"/v1/videos/{video['id']}/cancel")
