"""Dashboards and alert rules against a real Prometheus (Debian's `prometheus`) scraping the running test cluster.

Prometheus scrapes every Ray node's metrics port (file_sd, 1 s interval) and loads k8s/monitoring/alerts.rules.yaml.
Traffic through the HTTP API makes the series exist: completed jobs (S3 uploads, GPU-seconds by tenant), a job
cancelled mid-denoising, a job that fails past its deadline, plus an S3 error from a probe deployment that writes to
a bucket that does not exist. Then every target of every dashboard panel must return data, except the GPU-only ones
listed in GPU_ONLY_PANELS (no GPU series exist on a CPU node: Ray's reporter exports none, not zeros), and every
alert expression must evaluate without error.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray
import yaml

from serve import metrics as m
from tests.integration.conftest import ENHANCED, ENHANCED_MODEL
from tests.integration.test_api_e2e import TERMINAL, api, wait_for
from tests.integration.test_faults import LONG, in_denoising

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "k8s" / "monitoring"
RULES = MONITORING / "alerts.rules.yaml"
SETUP_HINT = "run scripts/setup.sh --test-tools (it installs Debian's `prometheus` package: the server and promtool)"
# Grafana's variables as a dashboard with everything selected expands them
VARIABLES = {"__rate_interval": "1m", "__range": "5m", "__interval": "15s", "__range_s": "300",
             "application": ".*", "model": "model-.*", "deployment": ".*"}
# panels whose every target reads GPU-only series (see serve.metrics.GPU_ONLY_SERIES): empty on a CPU node
GPU_ONLY_PANELS = {
    ("videogen-overview.json", "GPU utilisation per worker group and GPU (NVML)"),
    ("videogen-overview.json", "GPU utilisation per stage (NVML, per replica process)"),
    ("videogen-overview.json", "GPU memory used per worker group and GPU (NVML)"),
    ("videogen-overview.json", "GPU memory per stage replica (torch)"),
    ("videogen-stages.json", "GPU memory per replica: allocated, reserved, peak (torch)"),
    ("videogen-stages.json", "GPU memory per stage (NVML, per replica process)"),
    ("videogen-stages.json", "Enhancer GPU memory per replica: reserved, peak (torch)"),  # Enhancer
    # (and a Denoiser of several GPUs)
    ("videogen-stages.json", "Denoiser GPU memory per rank (replicas that span several GPUs): reserved, peak"),
}
SHORT = {"prompt": "a red kite over a windy beach"}  # the test config's defaults: 48x32, 9 frames, 4 steps
# Enhancer: an enhanced job (96x64 at 16 fps from the second model's native 48x32 at 8 fps: SR x2 + RIFE x2), one
# completed per round so that the Enhancer's panels have data
ENHANCED_JOB = {"prompt": "a quiet lake at dawn", "model": ENHANCED_MODEL, **ENHANCED, "num_frames": 17,
                "num_inference_steps": 2}
PROBE_APP = "videogen-obs-probe"


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` is not installed: {SETUP_HINT}", pytrace=False)
    return path


def expand(expr: str) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda mt: VARIABLES.get(mt.group(1), mt.group(0)), expr)


def metric_names(expr: str) -> set[str]:
    from tests.unit.test_metrics_catalog import metric_names as names

    return names(expr)


def dashboard_targets() -> list[tuple[str, str, str]]:
    """(file, panel title, expr) for every panel target."""
    out = []
    for path in sorted((MONITORING / "dashboards").glob("*.json")):
        board = json.loads(path.read_text())
        for panel in board["panels"] + [p for row in board["panels"] for p in row.get("panels", [])]:
            out += [(path.name, panel["title"], t["expr"]) for t in panel.get("targets", [])]
    return out


def gpu_only(expr: str) -> bool:
    names = metric_names(expr)
    return bool(names) and names <= m.GPU_ONLY_SERIES


class Prometheus:
    def __init__(self, base: str) -> None:
        self.base = base
        self.http = httpx.Client(base_url=base, timeout=10)

    def query(self, expr: str) -> dict[str, Any]:
        r = self.http.get("/api/v1/query", params={"query": expr})
        body = r.json()
        if r.status_code != 200 or body.get("status") != "success":
            raise AssertionError(f"{expr}\n -> {r.status_code} {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def series(self, expr: str) -> list[dict[str, Any]]:
        return self.query(expr)["result"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _service_discovery(tmp: Path) -> Path:
    """Ray's file_sd file (`<session dir>/prom_metrics_service_discovery.json`, linked from
    /tmp/ray/prom_metrics_service_discovery.json) when its dashboard runs; the test cluster runs without the
    dashboard, so the same content is written from `ray.nodes()` (each node's MetricsExportPort)."""
    try:
        session_dir = Path(ray._private.worker._global_node.get_session_dir_path())
        ray_file = session_dir / "prom_metrics_service_discovery.json"
        if ray_file.is_file():
            return ray_file
    except AttributeError:
        pass
    targets = [f"{n['NodeManagerAddress']}:{n['MetricsExportPort']}" for n in ray.nodes() if n["Alive"]]
    path = tmp / "prom_metrics_service_discovery.json"
    path.write_text(json.dumps([{"labels": {"job": "ray"}, "targets": targets}]))
    return path


@pytest.fixture(scope="module")
def prometheus(cluster, tmp_path_factory):
    binary = _binary("prometheus")
    tmp = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": "ray",
                            "file_sd_configs": [{"files": [str(_service_discovery(tmp))], "refresh_interval": "5s"}]}],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = _free_port()
    log = open(tmp / "prometheus.log", "wb")
    proc = subprocess.Popen([binary, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                            stdout=log, stderr=subprocess.STDOUT)
    prom = Prometheus(f"http://127.0.0.1:{port}")
    deadline = time.time() + 30
    while True:
        try:
            if prom.http.get("/-/ready").status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"prometheus did not start:\n{(tmp / 'prometheus.log').read_text()[-3000:]}")
        time.sleep(0.2)
    yield prom
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


# ---- traffic -------------------------------------------------------------------------------------------------------
def drive_traffic(cluster) -> dict[str, dict]:
    """A cancelled, a failed (deadline), two completed jobs and a completed enhanced one through the HTTP API;
    returns the final records."""
    with api(cluster) as http:
        cancelled = http.post("/v1/videos", json={**LONG, "seed": 11}).json()["id"]
        wait_for(http, cancelled, in_denoising, timeout_s=60)
        assert http.post(f"/v1/videos/{cancelled}/cancel").status_code == 200
        late = http.post("/v1/videos", json={**LONG, "seed": 12, "deadline_seconds": 1}).json()["id"]
        done = [http.post("/v1/videos", json={**SHORT, "seed": s}).json()["id"] for s in (13, 14)]
        done.append(http.post("/v1/videos", json={**ENHANCED_JOB, "seed": 15}).json()["id"])  # Enhancer
        return {j: wait_for(http, j, lambda v: v["status"] in TERMINAL, timeout_s=90, interval_s=0.2)
                for j in (cancelled, late, *done)}


def record_an_s3_error(cluster) -> None:
    """A probe deployment with the service's S3 metrics writes to a bucket that does not exist (moto answers
    NoSuchBucket): the error series come from a real failed call through Storage and deployments.metrics."""
    from ray import serve

    endpoint = cluster.config.s3.endpoint_url

    class S3Probe:  # defined here so that it is pickled by value for the replica
        def __init__(self) -> None:
            from deployments.metrics import S3Metrics
            from serve.config import S3Config
            from serve.storage import Storage

            self._storage = Storage(S3Config(bucket="videogen-obs-no-such-bucket", endpoint_url=endpoint,
                                             max_attempts=1), observer=S3Metrics())

        def probe(self) -> str:
            from serve.storage import StorageError

            try:
                self._storage.put_bytes(self._storage.key("probe.txt"), b"x", "text/plain")
            except StorageError as exc:
                return type(exc).__name__
            return "stored"

    handle = serve.run(serve.deployment(S3Probe, name="S3Probe", ray_actor_options={"num_cpus": 0}).bind(),
                       name=PROBE_APP, route_prefix=None)
    assert handle.probe.remote().result(timeout_s=60) == "StorageError"


@pytest.fixture
def s3_error_probe(cluster):
    from ray import serve

    yield lambda: record_an_s3_error(cluster)
    if PROBE_APP in serve.status().applications:
        serve.delete(PROBE_APP)


def complete_jobs(cluster, n: int, seed: int, enhanced: int = 0) -> None:
    """`n` default jobs and `enhanced` enhanced ones (ENHANCED_JOB), all completed."""
    bodies = [SHORT] * n + [ENHANCED_JOB] * enhanced  # Enhancer
    with api(cluster) as http:
        ids = [http.post("/v1/videos", json={**b, "seed": seed + i}).json()["id"] for i, b in enumerate(bodies)]
        done = [wait_for(http, j, lambda v: v["status"] in TERMINAL, timeout_s=60, interval_s=0.2) for j in ids]
    assert [v["status"] for v in done] == ["completed"] * len(bodies), done


def values(series: list[dict[str, Any]]) -> list[float]:
    return [float(s["value"][1]) for s in series]


def wait_until(prom: Prometheus, exprs: list[str], ok, timeout_s: float) -> None:
    """Poll the expressions until `ok(values)` holds for each (Ray exports replica metrics every 10 s)."""
    deadline = time.time() + timeout_s
    while not all(ok(values(prom.series(e))) for e in exprs) and time.time() < deadline:
        time.sleep(1)


# ---- tests ---------------------------------------------------------------------------------------------------------
def test_promtool_accepts_the_rules():
    promtool = _binary("promtool")
    r = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_alert_rules_behave_on_synthetic_series():
    promtool = _binary("promtool")
    r = subprocess.run([promtool, "test", "rules", "alerts.test.yaml"], cwd=MONITORING, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_dashboard_query_returns_data(cluster, prometheus, s3_error_probe):
    # 1. Every kind of outcome once. Prometheus cannot see the first increment of a series it never scraped before,
    #    so this round creates the series and the second one moves them within the panels' windows.
    jobs = drive_traffic(cluster)
    assert sorted(v["status"] for v in jobs.values()) == ["cancelled", "completed", "completed", "completed",
                                                          "failed"], jobs  # (the third completed: the enhanced job)
    assert any((v.get("error") or {}).get("code") == "deadline_exceeded" for v in jobs.values()), jobs
    s3_error_probe()
    exist = [
        'ray_videogen_jobs_finished_total{status="cancelled", reason="cancelled"}',
        'ray_videogen_jobs_finished_total{status="failed", reason="deadline_exceeded"}',
        'ray_videogen_job_attempt_failures_total{reason="stage_timeout"}',
        'ray_videogen_denoise_cancelled_total{deployment="Denoiser"}',
        'ray_videogen_s3_errors_total{deployment="S3Probe", operation="put", code="NoSuchBucket"}',
        'ray_serve_deployment_error_counter_total{deployment="Denoiser", exception_type="CancelledError"}',
        'ray_videogen_gpu_seconds_total{tenant="default", stage="denoiser"}',
        'ray_videogen_stage_processing_seconds_count{deployment="Enhancer"}',  # Enhancer
        'ray_videogen_gpu_seconds_total{tenant="default", stage="enhancer"}',  # Enhancer
    ]
    wait_until(prometheus, exist, bool, timeout_s=40)

    # 2. Two more completed jobs and an enhanced one, now seen as increases by rate() and histogram_quantile()
    complete_jobs(cluster, 2, seed=21, enhanced=1)
    traffic_done = time.time()
    moving = {  # panels whose targets must show the jobs of round 2 (a value > 0), not only exist
        ("videogen-overview.json", "Jobs finished per minute, by status"),
        ("videogen-overview.json", "End-to-end latency of completed jobs (accepted → completed)"),
        ("videogen-overview.json", "Stage requests per second"),
        ("videogen-overview.json", "S3 upload throughput by deployment"),
        ("videogen-overview.json", "GPUs in use by tenant (GPU-seconds per second)"),
        ("videogen-stages.json", "Compute time per call p50 / p95 / p99"),
        ("videogen-stages.json", "Denoising step time p50 / p95"),
        ("videogen-stages.json", "Video encoding time on the VAE or Enhancer replica (CPU) p50 / p95"),
        ("videogen-stages.json", "Enhancer compute time per call p50 / p95"),  # Enhancer
    }
    targets = dashboard_targets()
    positive = [expand(e) for f, title, e in targets if (f, title) in moving]
    assert len({(f, t) for f, t, e in targets if (f, t) in moving}) == len(moving)
    # a replica exports a snapshot of its metrics every metrics_report_interval_ms: wait for the one after round 2
    # (earlier snapshots with round 1's finishes would already make rates positive)
    export_s = ray._config.metrics_report_interval_ms() / 1000
    time.sleep(max(0.0, traffic_done + export_s + 3 - time.time()))
    wait_until(prometheus, positive, lambda vs: any(v > 0 for v in vs), timeout_s=20)

    # 3. Every panel query returns data: a finite value (histogram_quantile over no new observations is NaN)
    gpu = [(f, title, e) for f, title, e in targets if gpu_only(e)]
    cpu = [(f, title, e) for f, title, e in targets if not gpu_only(e)]
    checked = targets if ray.cluster_resources().get("GPU", 0) > 0 else cpu
    problems = []
    for f, title, e in checked:
        vs = values(prometheus.series(expand(e)))
        if not any(math.isfinite(v) for v in vs):
            problems.append(f"{f} | {title} | {expand(e)} -> {vs or 'no series'}")
        elif (f, title) in moving and expand(e) in positive and not any(v > 0 for v in vs):
            problems.append(f"{f} | {title} | {expand(e)} -> {vs} (the second round of jobs is not visible)")
    assert problems == [], "panels without data:\n" + "\n".join(problems)
    for path in sorted((MONITORING / "dashboards").glob("*.json")):  # and the dashboards' variables have values
        for var in json.loads(path.read_text())["templating"]["list"]:
            if var["type"] == "query":
                selector, label = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", var["query"]["query"]).groups()
                found = {s["metric"].get(label) for s in prometheus.series(f"group by ({label}) ({expand(selector)})")}
                assert found - {None, ""}, (path.name, var["name"])

    # Ray's own names that the dashboards and alerts use exist as listed (node and Serve ones on any node)
    present = {s["metric"]["__name__"] for s in prometheus.series('group by (__name__) ({__name__=~"ray_.+"})')}
    assert {n for n, kind in m.RAY_BUILTIN_METRICS.items() if kind != "gpu"} - present == set()

    # 4. GPU-only panels: listed on purpose, valid queries, and only metrics that exist on GPU nodes (Ray's reporter
    #    agent or the catalog's gpu_only gauges). On a CPU node they have no series at all (not zeros).
    assert {(f, title) for f, title, _ in gpu} == GPU_ONLY_PANELS
    assert not {(f, title) for f, title, _ in cpu} & GPU_ONLY_PANELS, "a GPU-only panel must have only GPU targets"
    from ray.dashboard.modules.reporter.reporter_agent import METRICS_GAUGES

    for _, _, expr in gpu:
        prometheus.query(expand(expr))
        for name in metric_names(expr):
            assert (name in m.exported_names() and m.exported_names()[name].gpu_only) or (
                m.RAY_BUILTIN_METRICS.get(name) == "gpu" and name.removeprefix("ray_") in METRICS_GAUGES), name

    # 5. Ray drops a gauge that is not set again within 2 x metrics_report_interval_ms (20 s): ours are re-set every
    #    few seconds, so they are still there well after the last job changed them
    time.sleep(max(0.0, traffic_done + 25 - time.time()))
    for gauge in (m.INGRESS_QUEUED, m.INGRESS_RUNNING, m.PROCESS_RSS):
        deployments = {s["metric"]["deployment"] for s in prometheus.series(f"last_over_time({gauge.exported}[2s])")}
        assert deployments >= set(gauge.recorded_by), (gauge.name, deployments)


def test_every_alert_expression_evaluates(cluster, prometheus):
    groups = yaml.safe_load(RULES.read_text())["groups"]
    for rule in (r for g in groups for r in g["rules"]):
        prometheus.query(rule["expr"])  # raises with Prometheus' error on a bad expression
    # and Prometheus itself loaded and evaluated every rule without error
    deadline = time.time() + 15
    while True:
        loaded = [r for g in prometheus.http.get("/api/v1/rules").json()["data"]["groups"] for r in g["rules"]]
        evaluated = all(not r.get("lastEvaluation", "0001").startswith("0001") for r in loaded)
        if len(loaded) == sum(len(g["rules"]) for g in groups) and evaluated:
            break
        assert time.time() < deadline, loaded
        time.sleep(0.5)
    bad = [(r["name"], r.get("lastError")) for r in loaded if r["health"] != "ok"]
    assert bad == []
    # nothing fires on a healthy cluster (every `for` is longer than this test; a `for: 0m` rule must stay quiet)
    firing = [a["labels"]["alertname"] for a in prometheus.http.get("/api/v1/alerts").json()["data"]["alerts"]
              if a["state"] == "firing"]
    assert firing == []

