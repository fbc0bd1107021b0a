"""The serving benchmark: the real serving graph (Ingress, the stage deployments' request methods, the job store,
the limiter actor, S3 uploads) on a local Ray cluster and moto S3, with stages that sleep instead of computing.

    python benchmarks/serving_benchmark.py --out BENCHMARKS.md

The stage deployments are the product's classes (TextEncoder, Denoiser, VaeDecoder: their locks, progress writes,
metrics, handoffs and the VaeDecoder's mp4 encode and upload); only the object each holds as `_stage` is replaced,
by one that sleeps for the configured seconds and hands on payloads of CogVideoX-5b's sizes (7.4 MB of prompt
embeddings, 4.5 MB of latents). They are injected through `model_application(classes=...)` (what `build_model_app` builds); the product's stage code
has no benchmark flag. The video itself is small (9 frames of 48x32): the mp4 encode of a real video is the
VaeDecoder's CPU work, not the serving layer's.

It reports, in one run on this machine:
- idle overhead per job at zero compute (submit -> completed), with its breakdown;
- S3 requests per job, by kind (counted at the S3 server), besides the uploads and heartbeats;
- throughput, steady state and whole burst, at 1, 2 and 4 Denoiser replicas, against the ideal (the slowest stage's
  replicas / its seconds);
- POST latency p50/p99 under a burst of 50 concurrent submits;
- the autoscaling timeline of a backlog: when Serve decided to scale, when the replicas were ready, jobs/s before and
  after.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EMBEDDINGS_BYTES = 7_400_000  # CogVideoX-5b: T5 226 tokens x 4096 bf16, positive and negative, plus masks
LATENTS_BYTES = 4_500_000  # CogVideoX-5b latents at 720x480, 49 frames, handed on to the VAE
FRAMES = (9, 32, 48)  # the delivered video (frames, height, width): small, see the module docstring
MODEL = "bench-5b"
OBSERVER = "videogen-bench-observer"
COUNTS_PATH = "/__bench_counts__"  # the user agent of the benchmark's own S3 reads (not counted)
API_KEY = "sk-bench"


# ---- the injected stages: the product's deployment classes over a sleeping `_stage` ---------------------------

class SleepingStages:
    """What the deployments call on their `_stage`, each sleeping its configured seconds."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.uncompiled_runs = 0
        self.fallbacks = 0
        self.last_decode_tiled = False

    def encode(self, prompt: str, negative: str | None, cfg: bool) -> np.ndarray:
        time.sleep(self.seconds)
        return np.ones(EMBEDDINGS_BYTES, dtype=np.uint8)

    def denoise(self, emb: np.ndarray, params: Any, on_step=None, should_cancel=None, image=None) -> np.ndarray:
        steps = max(1, int(params.num_inference_steps))
        for i in range(steps):
            if should_cancel is not None and should_cancel():
                raise RuntimeError("cancelled")
            time.sleep(self.seconds / steps)
            if on_step is not None:
                on_step(i + 1, steps)
        return np.ones(LATENTS_BYTES, dtype=np.uint8)

    def last_run_info(self) -> dict[str, Any]:
        return {"benchmark": "sleeping stage", "seconds": self.seconds}

    def decode_uint8(self, latents: np.ndarray) -> np.ndarray:
        time.sleep(self.seconds)
        frames = np.zeros((*FRAMES, 3), dtype=np.uint8)
        frames[..., 0] = np.arange(FRAMES[0], dtype=np.uint8)[:, None, None] * 20  # not constant: a real encode
        return frames


def stage_classes(seconds: dict[str, float]) -> dict:
    """Subclasses of the product's stage deployments whose `_stage` sleeps (built here: pickled by value)."""
    from deployments.denoiser import Denoiser
    from deployments.stage import StageReplica
    from deployments.text_encoder import TextEncoder
    from deployments.vae_decoder import VaeDecoder
    from serve.stages.stage import DENOISER, TEXT_ENCODER, VAE_DECODER

    def init(self, args, _s=None):
        StageReplica.__init__(self, args)
        self._stage = SleepingStages(self.bench_seconds)
        self._encoder = None

    made = {}
    for stage, base in ((TEXT_ENCODER, TextEncoder), (DENOISER, Denoiser), (VAE_DECODER, VaeDecoder)):
        made[stage] = type(f"Sleeping{base.__name__}", (base,),
                           {"__init__": init, "bench_seconds": seconds[stage.key], "__module__": __name__})
    return made


# ---- counting S3 requests at the server -------------------------------------------------------------------------

class S3Counter:
    """WSGI middleware in front of moto: every request, by method and the kind of object it touches."""

    _KINDS = [("jobs/progress/", "progress"), ("jobs/active/", "active marker"), ("jobs/index-asc/", "index"),
              ("jobs/index/", "index"), ("jobs/", "job record"), ("usage/", "usage"), ("videos/", "video objects"),
              ("idempotency/", "idempotency"), ("health/", "canary")]

    def __init__(self) -> None:
        self.app = None
        self.lock = threading.Lock()
        self.counts: Counter[tuple[str, str]] = Counter()

    def wrap(self, app):
        self.app = app
        return self

    def kind(self, path: str, query: str) -> str:
        from urllib.parse import parse_qs, unquote

        parts = unquote(path).lstrip("/").split("/", 1)  # path-style: /<bucket>/<key>
        key = parts[1] if len(parts) > 1 else ""
        if key:
            return self._name(key)
        q = parse_qs(query)
        if "prefix" in q or "list-type" in q:
            return f"list {self._name(q.get('prefix', [''])[0])}"
        return "bucket" if not q else f"bucket ?{'&'.join(sorted(q))}"

    def _name(self, key: str) -> str:
        for prefix, name in self._KINDS:
            if key.startswith(prefix):
                return name
        return key.split("/", 1)[0] or "bucket"

    def __call__(self, environ, start_response):
        if environ.get("PATH_INFO") == COUNTS_PATH:  # the benchmark asks for the counts so far
            import json

            body = json.dumps([[m, k, n] for (m, k), n in self.snapshot().items()]).encode()
            start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        if OBSERVER in environ.get("HTTP_USER_AGENT", ""):  # the benchmark's own reads are not the service's
            return self.app(environ, start_response)
        with self.lock:
            self.counts[(environ["REQUEST_METHOD"], self.kind(environ.get("PATH_INFO", ""),
                                                             environ.get("QUERY_STRING", "")))] += 1
        return self.app(environ, start_response)

    def snapshot(self) -> Counter:
        with self.lock:
            return Counter(self.counts)


# ---- the cluster --------------------------------------------------------------------------------------------------

@dataclass
class Bench:
    endpoint: str
    port: int
    base: str = ""

    def __post_init__(self) -> None:
        self.base = f"http://127.0.0.1:{self.port}"

    def s3_counts(self) -> Counter:
        """The S3 server's request counts so far, by (method, kind)."""
        return Counter({(m, k): n for m, k, n in httpx.get(self.endpoint + COUNTS_PATH, timeout=10).json()})


def run_s3_server(port_file: Path) -> None:
    """`--s3-server`: moto with the request counter, in a process of its own (as S3 is elsewhere in production:
    its CPU does not compete with the benchmark's client threads for one interpreter)."""
    import signal

    from serve.local_s3 import LocalS3Server

    counter = S3Counter()
    server = LocalS3Server(middleware=counter.wrap)
    partial = port_file.with_suffix(".part")
    partial.write_text(server.start())
    partial.rename(port_file)  # atomic: the benchmark never reads half an address
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    server.stop()


def start_s3_server() -> tuple[Any, str]:
    import subprocess
    import tempfile

    port_file = Path(tempfile.mkdtemp()) / "endpoint"
    proc = subprocess.Popen([sys.executable, __file__, "--s3-server", str(port_file)])
    deadline = time.monotonic() + 60
    while not (port_file.exists() and port_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return proc, port_file.read_text()


def settings(endpoint: str):
    from serve.config import IngressSettings

    plan = {"requests_per_minute": 600000, "burst": 10000, "max_concurrent_jobs": 10000,
            "daily_gpu_seconds": 1e12, "max_cost": 10**15, "max_steps": 200}
    return IngressSettings.model_validate({
        "model": {"name": MODEL, "family": "cogvideox-5b", "source": "./not-loaded-by-the-benchmark",
                  "device": "cpu", "defaults": {"width": FRAMES[2], "height": FRAMES[1], "num_frames": FRAMES[0],
                                                "num_inference_steps": 10, "max_side": 1360}},
        "api": {"api_keys": [API_KEY]},
        "keys": {"legacy_plan": "bench"},
        "plans": {"plans": {"bench": plan}},
        "usage": {"gpus_per_stage": {"text_encoder": 1, "denoiser": 1, "vae_decoder": 1}},
        "safety": {"blocked_terms": {}},
    })


def deploy(bench: Bench, seconds: dict[str, float], denoisers: int | dict, ingress: bool) -> None:
    from ray import serve

    from deployments.app import ingress_application, model_application
    from serve.config import DeploymentsConfig, IngressArgs, ModelAppArgs, S3Config

    s3 = S3Config(bucket="videogen-bench", endpoint_url=bench.endpoint, create_bucket=True)
    zero = {"ray_actor_options": {"num_cpus": 0}, "graceful_shutdown_timeout_s": 2}
    den = ({**zero, "num_replicas": denoisers} if isinstance(denoisers, int)
           else {**zero, "num_replicas": None, "autoscaling_config": denoisers})
    options = DeploymentsConfig.model_validate({
        "text_encoder": {**zero, "num_replicas": 1}, "denoiser": den, "vae_decoder": {**zero, "num_replicas": 1},
        "ingress": {**zero, "num_replicas": 1, "max_ongoing_requests": 256}})
    cfg = settings(bench.endpoint)
    margs = ModelAppArgs(model=cfg.model, s3=s3)
    serve.run(model_application(margs, classes=stage_classes(seconds), deployments=options),
              name=f"model-{MODEL}", route_prefix=None, blocking=False)
    if ingress:
        serve.run(ingress_application(IngressArgs(s3=s3), settings=cfg, deployments=options), name="videogen",
                  route_prefix="/", blocking=False)
    wait_running(f"model-{MODEL}", "Denoiser", denoisers if isinstance(denoisers, int) else denoisers["min_replicas"])
    wait_ready(bench.base)


def serve_details() -> dict:
    from ray.serve.context import _get_global_client

    return _get_global_client().get_serve_details()


def denoiser_replicas() -> tuple[int, int]:
    d = serve_details()["applications"][f"model-{MODEL}"]["deployments"]["Denoiser"]
    return int(d.get("target_num_replicas") or 0), sum(1 for r in d["replicas"] if r["state"] == "RUNNING")


def wait_running(app: str, deployment: str, n: int, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            apps = serve_details()["applications"]
            d = apps[app]["deployments"][deployment]
            if sum(1 for r in d["replicas"] if r["state"] == "RUNNING") == n and apps[app]["status"] == "RUNNING":
                return
        except KeyError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{app}/{deployment} did not reach {n} running replicas")


def wait_ready(base: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/readyz", timeout=5).status_code == 200:
                from deployments.ingress import CAPACITY_REFRESH_S

                time.sleep(CAPACITY_REFRESH_S + 0.5)  # the ingress's chain slots have seen the new stage replicas
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the ingress never became ready")


BODY = {"prompt": "a lighthouse at dusk, waves below", "model": MODEL, "size": f"{FRAMES[2]}x{FRAMES[1]}",
        "num_frames": FRAMES[0], "num_inference_steps": 10}
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def post(http: httpx.Client) -> tuple[str, float]:
    t0 = time.perf_counter()
    r = http.post("/v1/videos", json=BODY)
    took = time.perf_counter() - t0
    if r.status_code != 200:
        raise RuntimeError(f"POST answered {r.status_code}: {r.text[:300]}")
    return r.json()["id"], took


def run_sync(http: httpx.Client) -> tuple[dict, float, float]:
    """One job through POST /v1/videos/sync: (video, seconds from submit to its answer, the time it answered)."""
    t0 = time.perf_counter()
    r = http.post("/v1/videos/sync", json=BODY, params={"wait_s": 120})
    t1 = time.perf_counter()
    if r.status_code != 200 or r.json()["status"] != "completed":
        raise RuntimeError(f"sync job ended {r.status_code}: {r.text[:300]}")
    return r.json(), t1 - t0, t1


def client(bench: Bench, threads: int = 1) -> httpx.Client:
    limits = httpx.Limits(max_connections=max(10, threads), max_keepalive_connections=max(10, threads))
    return httpx.Client(base_url=bench.base, headers=AUTH, timeout=180, limits=limits)


def observer(bench: Bench):
    """The benchmark's own view of the job store (its S3 requests are not counted)."""
    import boto3
    from botocore.config import Config

    from serve.config import S3Config
    from serve.jobs.store import JobStore
    from serve.storage import Storage

    client = boto3.session.Session().client(
        "s3", endpoint_url=bench.endpoint, region_name="us-east-1",
        config=Config(user_agent_extra=OBSERVER, s3={"addressing_style": "path"}, signature_version="s3v4"))
    return JobStore(Storage(S3Config(bucket="videogen-bench", endpoint_url=bench.endpoint), client=client))


def settled(store, job_id: str, timeout_s: float = 60):
    """The job's record once it completed and owes nothing (its bill recorded, its active marker gone)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rec = store.get(job_id)
        if rec is not None and rec.is_terminal and not rec.obligations_pending:
            if rec.status != "completed":
                raise RuntimeError(f"job {job_id} ended {rec.status}: {rec.error}")
            if job_id not in store.list_active_ids():
                return rec
        time.sleep(0.02)
    raise RuntimeError(f"job {job_id} did not settle")


def drain(http: httpx.Client, ids: list[str], timeout_s: float = 300) -> dict[str, float]:
    """Poll until every job ended; returns job -> when this client first saw it completed (perf_counter)."""
    seen: dict[str, float] = {}
    deadline = time.monotonic() + timeout_s
    while len(seen) < len(ids) and time.monotonic() < deadline:
        for job_id in ids:
            if job_id not in seen:
                v = http.get(f"/v1/videos/{job_id}").json()
                if v["status"] in ("completed", "failed", "cancelled"):
                    if v["status"] != "completed":
                        raise RuntimeError(f"job {job_id} ended {v['status']}: {v.get('error')}")
                    seen[job_id] = time.perf_counter()
        time.sleep(0.2)
    if len(seen) < len(ids):
        raise RuntimeError(f"{len(ids) - len(seen)} jobs did not end")
    return seen


# ---- the measurements -----------------------------------------------------------------------------------------------

@dataclass
class Idle:
    jobs: int
    total_ms: list[float]
    post_ms: list[float]
    parts_ms: dict[str, float]
    s3: Counter
    s3_per_job: float


def measure_idle(bench: Bench, jobs: int) -> Idle:
    """Latency: `jobs` through POST /v1/videos/sync one after another. S3: `jobs` more, each a plain POST left to
    run to its end (bill recorded, marker gone) while the benchmark watches S3 itself (not counted)."""
    totals, posts, parts = [], [], Counter()
    store = observer(bench)
    with client(bench) as http:
        run_sync(http)  # warm: first calls of every path
        for _ in range(jobs):
            video, took, _ = run_sync(http)
            totals.append(took * 1000)
            rec = settled(store, video["id"])
            for k, v in rec.timings.items():
                parts[k] += v * 1000 / jobs
        for _ in range(jobs):
            job_id, took = post(http)
            posts.append(took * 1000)
            settled(store, job_id)
        time.sleep(1)
        before = bench.s3_counts()
        for _ in range(jobs):
            settled(store, post(http)[0])
        counted = bench.s3_counts() - before
    return Idle(jobs, totals, posts, dict(parts), counted, sum(counted.values()) / jobs)


@dataclass
class Throughput:
    denoiser_s: float
    denoisers: int
    jobs: int
    ideal: float
    steady: float
    burst: float


def ideal_rate(seconds: dict[str, float], denoisers: int) -> float:
    rates = [1 / seconds["text_encoder"] if seconds["text_encoder"] else float("inf"),
             denoisers / seconds["denoiser"], 1 / seconds["vae_decoder"] if seconds["vae_decoder"] else float("inf")]
    return min(rates)


def measure_throughput(bench: Bench, seconds: dict[str, float], denoisers: int, jobs: int) -> Throughput:
    with client(bench, threads=jobs) as http, ThreadPoolExecutor(jobs) as pool:
        run_sync(http)
        t0 = time.perf_counter()
        done = sorted(f.result()[2] for f in [pool.submit(run_sync, http) for _ in range(jobs)])
    # steady state: the middle of the burst (the 20th to the 80th percentile of completions), as the least-squares
    # slope of completions over time (n replicas finish in clumps of n: a two-point ratio would swing with them)
    lo, hi = int(0.2 * jobs), int(0.8 * jobs)
    ts = np.array(done[lo:hi + 1])
    steady = float(np.polyfit(ts - ts[0], np.arange(len(ts), dtype=float), 1)[0])
    return Throughput(seconds["denoiser"], denoisers, jobs, ideal_rate(seconds, denoisers), steady,
                      jobs / (done[-1] - t0))


def measure_post_burst(bench: Bench, concurrent: int) -> tuple[list[float], list[float]]:
    """(POST /v1/videos ms, GET /healthz ms) of `concurrent` requests released at once: the second is the floor
    of this machine's HTTP path (Serve's proxy, the ingress's event loop, the client's threads) under the same
    burst, with no admission and no S3."""
    with client(bench, threads=concurrent) as http, ThreadPoolExecutor(concurrent) as pool:
        post(http)
        barrier = threading.Barrier(concurrent)

        def healthz() -> float:
            barrier.wait()
            t0 = time.perf_counter()
            http.get("/healthz")
            return (time.perf_counter() - t0) * 1000

        floor = sorted(f.result() for f in [pool.submit(healthz) for _ in range(concurrent)])

        def one() -> tuple[str, float]:
            barrier.wait()
            return post(http)

        results = [f.result() for f in [pool.submit(one) for _ in range(concurrent)]]
        drain(http, [r[0] for r in results])
    return sorted(r[1] * 1000 for r in results), floor


@dataclass
class Timeline:
    jobs: int
    policy: dict
    samples: list[tuple[float, int, int, int]] = field(default_factory=list)  # (t, target, running, completed)
    decided_s: float | None = None
    ready_s: float | None = None
    rate_before: float | None = None
    rate_after: float | None = None
    last_s: float = 0.0


def measure_autoscaling(bench: Bench, jobs: int, policy: dict) -> Timeline:
    """`jobs` submitted at once (each a POST /v1/videos/sync, so its completion time is exact) while a sampler reads
    the Denoiser's target and running replicas from Serve's controller every 0.25 s."""
    tl = Timeline(jobs, policy)
    top = policy["max_replicas"]
    stop = threading.Event()
    t0 = time.perf_counter()

    def sample() -> None:
        while not stop.is_set():
            target, running = denoiser_replicas()
            now = time.perf_counter() - t0
            tl.samples.append((round(now, 1), target, running, -1))
            if tl.decided_s is None and target >= top:
                tl.decided_s = now
            if tl.ready_s is None and running >= top:
                tl.ready_s = now
            time.sleep(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with client(bench, threads=jobs) as http, ThreadPoolExecutor(jobs) as pool:
        times = sorted(f.result()[2] - t0 for f in [pool.submit(run_sync, http) for _ in range(jobs)])
    time.sleep(1)
    stop.set()
    sampler.join(5)
    tl.samples = [(t, g, n, sum(1 for c in times if c <= t)) for t, g, n, _ in tl.samples]
    tl.last_s = times[-1]
    if tl.ready_s is not None:
        before = [t for t in times if t <= tl.ready_s]
        after = [t for t in times if t > tl.ready_s]
        tl.rate_before = len(before) / tl.ready_s
        if len(after) >= 2:
            tl.rate_after = (len(after) - 1) / (after[-1] - after[0])
    return tl


# ---- the table ----------------------------------------------------------------------------------------------------

def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def render(args, idle: Idle, seconds: dict[str, float], rows: list[Throughput], post_ms: list[float],
           floor_ms: list[float], tl: Timeline, took_s: float) -> str:
    lines = [f"## Serving benchmark ({time.strftime('%Y-%m-%d')})", "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, no GPU; local Ray "
             f"(one node), moto S3 on 127.0.0.1. Command: `python benchmarks/serving_benchmark.py "
             f"{' '.join(sys.argv[1:])}` ({took_s:.0f} s). Stages sleep instead of computing and hand on "
             f"CogVideoX-5b-sized payloads ({EMBEDDINGS_BYTES / 1e6:.1f} MB embeddings, {LATENTS_BYTES / 1e6:.1f} MB "
             f"latents); the video is {FRAMES[0]} frames of {FRAMES[2]}x{FRAMES[1]}.", ""]
    serving = statistics.median(idle.total_ms)
    lines += ["### Idle overhead per job (zero compute)", "",
              f"{idle.jobs} jobs one after another through `POST /v1/videos/sync` (its answer is the job's terminal "
              f"record, handed over in the replica); every stage sleeps 0 s. The parts are the job record's timings "
              f"(each stage's, measured inside it) and {idle.jobs} plain POSTs.", "",
              "| part | ms (median job, or mean of the parts) |", "|---|---:|",
              f"| submit -> completed, total | {serving:.0f} (p90 {pct(idle.total_ms, 0.9):.0f}) |",
              f"| of which the POST itself (admission, record) | {statistics.median(idle.post_ms):.0f} |"]
    for k, v in sorted(idle.parts_ms.items()):
        lines.append(f"| of which `{k}` (measured in the stage) | {v:.1f} |")
    inside = sum(idle.parts_ms.values()) + statistics.median(idle.post_ms)
    lines += [f"| the rest: dispatch, lease, attempt start, handoffs, progress, terminal write | "
              f"{max(0.0, serving - inside):.0f} |", "", f"Target: <= 150 ms. "
              f"{'Met' if serving <= 150 else 'Not met'}: {serving:.0f} ms.", ""]
    lines += ["### S3 requests per job", "",
              f"Counted at the S3 server over {idle.jobs} more idle jobs, each a plain POST run to its end (bill "
              f"recorded, active marker gone) with no client polling it; the benchmark's own reads are not counted. "
              f"No heartbeat fell in a job (heartbeat_s 5); the reclaim scan (every ~10 s, cluster-wide) may add its "
              f"listing.", "",
              "| request | per job |", "|---|---:|"]
    for (method, kind), n in sorted(idle.s3.items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"| {method} {kind} | {n / idle.jobs:.1f} |")
    uploads = sum(n for (m, k), n in idle.s3.items() if k == "video objects" and m == "PUT") / idle.jobs
    lines += [f"| **total** | **{idle.s3_per_job:.1f}** |", "",
              f"Besides the {uploads:.0f} uploads (mp4, cover, metadata): {idle.s3_per_job - uploads:.1f} per job; "
              f"target ~12.", ""]
    lines += ["### Throughput against the ideal", "",
              f"Stage seconds: text encoder {seconds['text_encoder']}, VaeDecoder {seconds['vae_decoder']} (one "
              f"replica each), the Denoiser's as below. Ideal: the slowest stage's replicas / its seconds. Steady "
              f"state: the least-squares slope of completions over time between the 20th and 80th percentile of a "
              f"burst of jobs submitted at once (`POST /v1/videos/sync` each); whole burst: jobs / (last completion - submit). Gain per added "
              f"replica: (steady(n) - steady(1)) / ((n - 1) x steady(1)), against the 1-replica row of the same "
              f"Denoiser seconds.", "",
              "| Denoiser s | Denoisers | jobs | ideal jobs/s | steady jobs/s | steady / ideal | whole burst jobs/s | "
              "burst / ideal | gain per added replica |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        base = next(b.steady for b in rows if b.denoiser_s == r.denoiser_s and b.denoisers == 1)
        gain = "" if r.denoisers == 1 else f"{(r.steady - base) / ((r.denoisers - 1) * base):.0%}"
        lines.append(f"| {r.denoiser_s:g} | {r.denoisers} | {r.jobs} | {r.ideal:.2f} | {r.steady:.2f} | "
                     f"{r.steady / r.ideal:.0%} | {r.burst:.2f} | {r.burst / r.ideal:.0%} | {gain} |")
    lines += ["", "Targets: >= 98% of ideal in steady state with the 0.25 s Denoiser; >= 95% per added replica.", ""]
    lines += ["### POST latency under a burst", "",
              f"{len(post_ms)} concurrent `POST /v1/videos` (one Denoiser), released at once by a barrier.", "",
              "| request | p50 ms | p90 ms | p99 ms | max ms |", "|---|---:|---:|---:|---:|",
              f"| POST /v1/videos | {pct(post_ms, 0.5):.0f} | {pct(post_ms, 0.9):.0f} | {pct(post_ms, 0.99):.0f} | "
              f"{max(post_ms):.0f} |",
              f"| GET /healthz, the same burst (the HTTP path's floor here) | {pct(floor_ms, 0.5):.0f} | "
              f"{pct(floor_ms, 0.9):.0f} | {pct(floor_ms, 0.99):.0f} | {max(floor_ms):.0f} |",
              "", f"Target: p99 <= 300 ms. {'Met' if pct(post_ms, 0.99) <= 300 else 'Not met'}.", ""]
    lines += ["### Autoscaling on a backlog", "",
              f"{tl.jobs} jobs submitted at once; the Denoiser's autoscaling_config: `{tl.policy}`.", "",
              "| event | seconds after the burst |", "|---|---:|",
              f"| Serve decided {tl.policy['max_replicas']} Denoisers | "
              f"{'never' if tl.decided_s is None else f'{tl.decided_s:.1f}'} |",
              f"| {tl.policy['max_replicas']} Denoisers running | "
              f"{'never' if tl.ready_s is None else f'{tl.ready_s:.1f}'} |",
              f"| last job completed | {tl.last_s:.1f} |", "",
              f"Jobs/s before the replicas were ready: {tl.rate_before or 0:.2f}; after: {tl.rate_after or 0:.2f}.",
              "", "<details><summary>timeline (t, target, running, completed)</summary>", "", "```"]
    lines += [f"{t:>6.1f}s target={g} running={n} completed={c}" for t, g, n, c in tl.samples]
    lines += ["```", "", "</details>", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="Append the table to this file (BENCHMARKS.md).")
    parser.add_argument("--idle-jobs", type=int, default=20)
    parser.add_argument("--burst-jobs", type=int, default=30, help="Jobs per throughput burst at 1 Denoiser.")
    parser.add_argument("--denoisers", default="1,2,4", help="Replicas of the scaling rows.")
    parser.add_argument("--scaling-denoiser-s", type=float, default=1.0,
                        help="The Denoiser's seconds in the scaling rows (a 0.25 s row at 1 replica comes first): "
                             "slow enough that this machine's CPU is not what 4 replicas wait for.")
    parser.add_argument("--te-s", type=float, default=0.02)
    parser.add_argument("--denoiser-s", type=float, default=0.25)
    parser.add_argument("--vae-s", type=float, default=0.05)
    parser.add_argument("--post-burst", type=int, default=50)
    parser.add_argument("--autoscale-jobs", type=int, default=80)
    parser.add_argument("--s3-server", type=Path, help=argparse.SUPPRESS)  # the S3 process (internal)
    args = parser.parse_args(argv)
    if args.s3_server is not None:
        run_s3_server(args.s3_server)
        return 0

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    import ray
    from ray import serve

    started = time.monotonic()
    s3, endpoint = start_s3_server()
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {k: v for k, v in os.environ.items() if k.startswith("AWS_")}})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    bench = Bench(endpoint, port)
    zero = {"text_encoder": 0.0, "denoiser": 0.0, "vae_decoder": 0.0}
    seconds = {"text_encoder": args.te_s, "denoiser": args.denoiser_s, "vae_decoder": args.vae_s}
    try:
        deploy(bench, zero, 1, ingress=True)
        idle = measure_idle(bench, args.idle_jobs)
        print(f"idle: median {statistics.median(idle.total_ms):.0f} ms, {idle.s3_per_job:.1f} S3 requests/job",
              flush=True)
        rows = []
        scaling = {**seconds, "denoiser": args.scaling_denoiser_s}
        for secs, n in [(seconds, 1)] + [(scaling, int(x)) for x in args.denoisers.split(",")]:
            deploy(bench, secs, n, ingress=False)
            rows.append(measure_throughput(bench, secs, n, args.burst_jobs * n))
            r = rows[-1]
            print(f"{n} x {secs['denoiser']} s Denoisers: steady {r.steady:.2f} jobs/s, burst {r.burst:.2f}, "
                  f"ideal {r.ideal:.2f}", flush=True)
        deploy(bench, seconds, 1, ingress=False)
        post_ms, floor_ms = measure_post_burst(bench, args.post_burst)
        print(f"POST burst: p50 {pct(post_ms, 0.5):.0f} ms, p99 {pct(post_ms, 0.99):.0f} ms", flush=True)
        policy = {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 1, "upscale_delay_s": 0,
                  "downscale_delay_s": 10, "policy": {"policy_function": "deployments.autoscaling:BacklogPolicy"}}
        deploy(bench, seconds, policy, ingress=False)
        tl = measure_autoscaling(bench, args.autoscale_jobs, policy)
        print(f"autoscaling: decided {tl.decided_s}, ready {tl.ready_s}, before {tl.rate_before}, "
              f"after {tl.rate_after}", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
        s3.terminate()
        s3.wait(10)
    text = render(args, idle, seconds, rows, post_ms, floor_ms, tl, time.monotonic() - started)
    print(text)
    if args.out is not None:
        existing = args.out.read_text() if args.out.exists() else "# Benchmarks\n"
        args.out.write_text(existing.rstrip("\n") + "\n\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
