"""The metric catalog (serve/metrics.py) against the dashboards and alert rules under k8s/monitoring/. No Ray.

Names carry their unit, label sets are bounded, and every name a panel or an alert uses is either declared in the
catalog or a Ray built-in listed in `RAY_BUILTIN_METRICS` (tests/integration/test_observability.py then checks that
each query returns data from a Prometheus that scraped a running cluster).
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from serve import metrics as m
from serve.config import S3Config
from serve.storage import NotFound, PreconditionFailed, Storage, StorageError

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "k8s" / "monitoring"
DASHBOARDS = sorted((MONITORING / "dashboards").glob("*.json"))
RULES = MONITORING / "alerts.rules.yaml"

# a metric family name ends with the unit of what it measures (or what it counts)
UNITS = ("_seconds", "_bytes", "_jobs", "_ratio")
FORBIDDEN_LABELS = {"job", "job_id", "id", "video_id", "prompt", "key", "api_key", "url", "webhook_url", "request_id",
                    "path", "seed", "error", "message", "trace_id"}
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                   "offset", "inf", "nan"}


# ---- PromQL helpers ------------------------------------------------------------------------------------------------
def metric_names(expr: str) -> set[str]:
    """Metric names an expression reads (strings, matchers, ranges, label lists and functions removed)."""
    s = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)
    s = re.sub(r"\$\{?\w+\}?", "x", s)  # Grafana variables
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\boffset\s+\S+", " ", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for match in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", s):
        name, call = match.group(1), match.group(2)
        if call or name in PROMQL_KEYWORDS or name == "x":
            continue
        names.add(name)
    return names


def test_metric_names_finds_metrics_only():
    expr = ('histogram_quantile(0.95, sum by (deployment, le) (rate(ray_a_seconds_bucket{application=~"$application"}'
            '[$__rate_interval]))) > on (deployment) group_left () (label_replace(vector(5), "deployment", "X", "", "")'
            ' or ray_b offset 15m) unless ray_c_total * 1048576')
    assert metric_names(expr) == {"ray_a_seconds_bucket", "ray_b", "ray_c_total"}


def dashboards() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, json.loads(p.read_text(encoding="utf-8"))) for p in DASHBOARDS]


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in board.get("panels", []):
        out.append(p)
        out.extend(p.get("panels", []))  # collapsed rows hold their panels
    return out


def dashboard_exprs() -> list[tuple[str, str, str]]:
    """(file, panel title, expr) of every target of every dashboard."""
    return [(p.name, panel.get("title", ""), t["expr"]) for p, board in dashboards() for panel in panels(board)
            for t in panel.get("targets", [])]


def variable_exprs() -> list[tuple[str, str, str]]:
    """(file, variable name, selector) of every `label_values(selector, label)` template variable."""
    out = []
    for p, board in dashboards():
        for var in board["templating"]["list"]:
            if var["type"] == "query":
                match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", var["query"]["query"])
                assert match, (p.name, var["name"], "only label_values(selector, label) variables")
                out.append((p.name, var["name"], match.group(1)))
    return out


def rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return [r for g in data["groups"] for r in g["rules"]]


# ---- the catalog ---------------------------------------------------------------------------------------------------
def test_names_are_unique_and_carry_their_unit():
    names = [spec.name for spec in m.CATALOG]
    assert len(names) == len(set(names))
    for spec in m.CATALOG:
        assert re.fullmatch(r"videogen_[a-z0-9_]+", spec.name), spec.name
        if spec.kind == "counter":
            assert spec.name.endswith("_total"), f"{spec.name}: a counter ends in _total"
        else:
            assert not spec.name.endswith("_total"), f"{spec.name}: only counters end in _total"
            assert spec.name.endswith(UNITS), f"{spec.name}: no unit suffix ({UNITS})"
        if spec.kind == "histogram":
            assert spec.name.endswith(("_seconds", "_bytes")), spec.name
            assert list(spec.buckets) == sorted(set(spec.buckets)) and spec.buckets[0] > 0, spec.name
        else:
            assert spec.buckets == (), spec.name
        assert spec.description and spec.recorded_by, spec.name
        assert set(spec.recorded_by) <= set(m.ALL), spec.name


def test_stage_buckets_reach_tens_of_minutes():
    assert m.STAGE_PROCESSING.buckets[-1] >= 1800
    assert m.JOB_DURATION.buckets[-1] >= 3600


def test_label_sets_are_bounded():
    for spec in m.CATALOG:
        assert not set(spec.tag_keys) & set(m.SERVE_TAGS), f"{spec.name}: Serve adds {m.SERVE_TAGS} itself"
        assert not set(spec.tag_keys) & FORBIDDEN_LABELS, f"{spec.name}: unbounded label"
        for key in spec.tag_keys:
            assert key in m.LABEL_VALUES, f"{spec.name}: label {key!r} has no documented value set"
    for key, values in m.LABEL_VALUES.items():
        if values is None:
            assert key == "tenant"  # bounded by the keys file, documented in serve/metrics.py
        else:
            assert 0 < len(values) <= 50 and len(set(values)) == len(values), key
    assert m.bounded("video_0123", m.JOB_REASONS) == "other"


def test_every_metric_is_created_by_the_deployments():
    source = (ROOT / "deployments" / "metrics.py").read_text()
    constants = {v: k for k, v in vars(m).items() if isinstance(v, m.Metric)}
    for spec in m.CATALOG:
        assert re.search(rf"create\({constants[spec]}\)", source), f"{spec.name} is declared but never created"


def test_every_metric_is_on_a_dashboard_or_an_alert():
    used = {n for _, _, e in dashboard_exprs() for n in metric_names(e)}
    alerted = {n for r in rules() for n in metric_names(r["expr"])}
    for spec in m.CATALOG:
        if spec.no_panel:
            assert set(spec.series) & alerted, f"{spec.name}: no panel ({spec.no_panel}) and no alert"
        else:
            assert set(spec.series) & used, f"{spec.name} is on no dashboard"


# ---- dashboards and alerts use only known names --------------------------------------------------------------------
def known_names() -> set[str]:
    return set(m.exported_names()) | set(m.RAY_BUILTIN_METRICS)


def test_dashboards_and_alerts_use_only_declared_or_builtin_names():
    exprs = dashboard_exprs() + variable_exprs()
    unknown = {(f, title, n) for f, title, e in exprs for n in metric_names(e) if n not in known_names()}
    unknown |= {(RULES.name, r["alert"], n) for r in rules() for n in metric_names(r["expr"]) if n not in known_names()}
    assert unknown == set()
    # and the built-in list holds no name that nothing uses
    used = {n for _, _, e in exprs for n in metric_names(e)} | {n for r in rules() for n in metric_names(r["expr"])}
    assert set(m.RAY_BUILTIN_METRICS) - used == set()


def test_no_query_filters_or_groups_on_unbounded_labels():
    for f, title, expr in dashboard_exprs() + [(RULES.name, r["alert"], r["expr"]) for r in rules()]:
        labels = set(re.findall(r"\b(\w+)\s*(?:=~|!~|!=|=)\s*\"", expr))
        for group in re.findall(r"\b(?:by|on)\s*\(([^)]*)\)", expr):
            labels |= {x.strip() for x in group.split(",") if x.strip()}
        assert not labels & FORBIDDEN_LABELS, (f, title, labels & FORBIDDEN_LABELS)


# ---- Serve applications: the ingress (`videogen`) and one per model (`model-<name>`) -------------------------------
def recorded_in(name: str) -> str | None:
    """Where a catalog series comes from: "ingress" if only the Ingress records it (application="videogen"),
    "stages" if only stage deployments do (application="model-<name>"); None if both do, or for a Ray built-in."""
    spec = m.exported_names().get(name)
    if spec is None or not spec.recorded_by:
        return None
    if set(spec.recorded_by) == {"Ingress"}:
        return "ingress"
    return None if "Ingress" in spec.recorded_by else "stages"


def test_panels_filter_each_metric_on_the_applications_that_record_it():
    wanted = {"ingress": "$application", "stages": "$model"}
    for f, title, expr in dashboard_exprs():
        for name, matchers in re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}", expr):
            where = recorded_in(name)
            if where is not None:
                app = re.search(r'\bapplication=~"([^"]*)"', matchers)
                assert app and app.group(1) == wanted[where], (f, title, name, app and app.group(1))


def test_per_deployment_groupings_keep_the_application():
    # every model application names its stages TextEncoder, Denoiser, VaeDecoder: by deployment alone merges models
    exprs = dashboard_exprs() + [(RULES.name, r["alert"], r["expr"]) for r in rules()]
    for f, title, expr in exprs:
        for group in re.findall(r"\bby\s*\(([^)]*)\)", expr):
            labels = {x.strip() for x in group.split(",")}
            assert "deployment" not in labels or "application" in labels, (f, title, group)


def test_alerts_joining_ingress_and_stage_metrics_do_not_match_on_the_application():
    for rule in rules():
        where = {recorded_in(n) for n in metric_names(rule["expr"])}
        if {"ingress", "stages"} <= where:
            assert not re.search(r"\b(?:on|group_left|group_right)\s*\([^)]*\bapplication\b", rule["expr"]), \
                (rule["alert"], "ingress series carry application=videogen, stage series application=model-<name>")


# ---- dashboard structure -------------------------------------------------------------------------------------------
def test_dashboards_exist_and_are_grafana_dashboards():
    assert {p.name for p in DASHBOARDS} >= {"videogen-overview.json", "videogen-stages.json"}
    uids = [board["uid"] for _, board in dashboards()]
    assert len(uids) == len(set(uids))
    for path, board in dashboards():
        assert board["schemaVersion"] >= 36 and board["title"], path.name
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
        ids = [p["id"] for p in panels(board)]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
        for panel in panels(board):
            grid = panel["gridPos"]
            assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, (path.name, panel["title"])
            if panel["type"] == "row":
                continue
            assert panel["title"] and panel.get("description"), (path.name, panel["id"])
            assert panel["datasource"]["uid"] == "${datasource}", (path.name, panel["title"])
            targets = panel.get("targets", [])
            assert targets and all(t.get("expr", "").strip() for t in targets), (path.name, panel["title"])
            assert len({t["refId"] for t in targets}) == len(targets), (path.name, panel["title"])


def test_variables_used_in_queries_are_defined():
    builtin = {"__rate_interval", "__range", "__interval", "__range_s"}
    for path, board in dashboards():
        defined = {v["name"] for v in board["templating"]["list"]} | builtin
        for panel in panels(board):
            for t in panel.get("targets", []):
                used = set(re.findall(r"\$\{?([A-Za-z_]\w*)", t["expr"]))
                assert used <= defined, (path.name, panel["title"], used - defined)


# ---- alert rules structure ------------------------------------------------------------------------------------------
def test_every_alert_has_for_severity_summary_description_and_runbook():
    names = set()
    for rule in rules():
        assert "alert" in rule, f"recording rules do not belong in {RULES.name}"
        names.add(rule["alert"])
        assert re.fullmatch(r"\d+[smh]", str(rule.get("for", ""))), (rule["alert"], "needs a `for`")
        assert rule["labels"]["severity"] in ("info", "warning", "critical"), rule["alert"]
        for key in ("summary", "description", "runbook"):
            assert rule["annotations"].get(key), (rule["alert"], key)
    assert names >= {"VideogenJobFailureRateHigh", "VideogenQueueStalledGpusIdle", "VideogenStageLatencySLO",
                     "VideogenS3ErrorRate", "VideogenStageReplicasRestarting", "VideogenStageNoHealthyReplicas"}


# ---- what serve/ code reports --------------------------------------------------------------------------------------
class _ClientError(Exception):
    def __init__(self, code: str, status: int) -> None:
        super().__init__(code)
        self.response = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}


class EndpointConnectionError(Exception):
    pass


def test_s3_error_codes_are_bounded_and_expected_answers_are_not_errors():
    assert m.s3_error_code(_ClientError("SlowDown", 503)) == "SlowDown"
    assert m.s3_error_code(_ClientError("", 503)) == "503"
    assert m.s3_error_code(_ClientError("SomethingNew", 400)) == "other"
    assert m.s3_error_code(_ClientError("NoSuchKey", 404)) is None
    assert m.s3_error_code(_ClientError("PreconditionFailed", 412)) is None
    assert m.s3_error_code(EndpointConnectionError("down")) == "EndpointConnectionError"
    assert m.s3_error_code(ValueError("x")) == "other"


def test_storage_reports_each_s3_call_to_its_observer(s3_server: str):
    seen: list[tuple[str, int, str | None]] = []
    cfg = S3Config(bucket="metrics-observer-test", endpoint_url=s3_server, create_bucket=True, max_attempts=1)
    st = Storage(cfg, observer=lambda op, seconds, sent, error: seen.append((op, sent, error)))
    st.ensure_bucket()
    st.put_bytes(st.key("a.bin"), b"12345", "application/octet-stream")
    assert st.get_with_etag(st.key("missing")) is None
    with pytest.raises(NotFound):
        st.head(st.key("missing"))
    etag = st.put_if_absent(st.key("r.json"), b"{}")
    with pytest.raises(PreconditionFailed):
        st.put_if_absent(st.key("r.json"), b"{}")
    st.put_if_match(st.key("r.json"), b'{"a":1}', etag)
    missing_bucket = Storage(cfg.model_copy(update={"bucket": "metrics-observer-no-bucket"}),
                             observer=lambda op, seconds, sent, error: seen.append((op, sent, error)))
    with pytest.raises(StorageError):
        missing_bucket.put_bytes(missing_bucket.key("x"), b"x", "text/plain")
    assert seen == [
        ("create_bucket", 0, None), ("put", 5, None), ("get", 0, None), ("head", 0, None),
        ("conditional_put", 2, None), ("conditional_put", 0, None), ("conditional_put", 7, None),
        ("put", 0, "NoSuchBucket"),
    ]
    assert all(op in m.S3_OPERATIONS for op, _, _ in seen)


def test_runner_reports_attempts_and_terminal_statuses(storage: Storage):
    from serve.config import JobsConfig
    from serve.jobs.record import ChainResult, JobRecord, JobResult, new_job_id
    from serve.jobs.runner import JobRunner
    from serve.jobs.store import JobStore
    from serve.stages.stage import StageUnavailable
    from tests.params import example_params

    class Recorder(m.JobEvents):
        def __init__(self) -> None:
            self.calls: list[tuple[Any, ...]] = []

        def queue_changed(self, queued: int, running: int) -> None:
            self.calls.append(("queue", queued, running))

        def attempt_started(self, job: JobRecord, now: float) -> None:
            self.calls.append(("started", job.attempts))

        def attempt_failed(self, job: JobRecord, code: str) -> None:
            self.calls.append(("failed", code))

        def job_finished(self, job: JobRecord, now: float) -> None:
            self.calls.append(("finished", job.status, m.job_reason(job), m.job_age_seconds(job, now) >= 0))

    class FailsOnce:
        def __init__(self) -> None:
            self.calls = 0

        async def run(self, job: JobRecord) -> dict[str, Any]:
            self.calls += 1
            if self.calls == 1:
                raise StageUnavailable("Denoiser", "ActorDiedError")
            return ChainResult(JobResult(video_key=f"videos/{job.id}.mp4"), {"denoiser_s": 1.0})

    async def scenario() -> list[tuple[Any, ...]]:
        store = JobStore(storage)
        events = Recorder()
        cfg = JobsConfig(max_attempts=3, lease_s=5, heartbeat_s=0.2, reclaim_interval_s=60, retry_backoff_s=0)
        runner = JobRunner(store, FailsOnce(), cfg, "owner-a", events=events)
        job = JobRecord(id=new_job_id(), status="queued", created_at=0, model="m", prompt="p",
                        params=example_params(num_inference_steps=2))
        store.create(job)
        runner.submit(job.id, job.tenant)
        for _ in range(400):
            if any(c[0] == "finished" for c in events.calls):
                break
            await asyncio.sleep(0.05)
        await runner.stop()
        return events.calls

    calls = asyncio.run(scenario())
    assert [c for c in calls if c[0] != "queue"] == [
        ("started", 1), ("failed", "replica_died"), ("started", 2), ("finished", "completed", "none", True)]
    assert calls[0] == ("queue", 0, 1) and ("queue", 0, 0) in calls
