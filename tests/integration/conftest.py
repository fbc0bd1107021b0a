"""One local Ray cluster + one moto S3 server + the Serve app on tiny models, shared by the session."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from deployments.local import wait_ready

API_KEY = "sk-test-integration"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# plans of the test tenants: "it" is generous; the others exist to hit one limit each
PLANS = {
    "it": {"requests_per_minute": 6000, "burst": 100, "max_concurrent_jobs": 32, "daily_gpu_seconds": 1e9,
           "max_cost": 10**12, "max_steps": 200},
    "ratelimited": {"requests_per_minute": 2, "burst": 2, "max_concurrent_jobs": 8, "daily_gpu_seconds": 1e9,
                    "max_cost": 10**12, "max_steps": 200},
    "quota": {"requests_per_minute": 6000, "burst": 100, "max_concurrent_jobs": 8, "daily_gpu_seconds": 0.01,
              "max_cost": 10**12, "max_steps": 200},
    "small": {"requests_per_minute": 6000, "burst": 100, "max_concurrent_jobs": 8, "daily_gpu_seconds": 1e9,
              "max_cost": 48 * 32 * 9 * 4, "max_steps": 200},
}
TENANTS = {"acme": "it", "globex": "it", "slowpoke": "ratelimited", "thrifty": "quota", "frugal": "small"}


def write_keys(path: Path) -> dict[str, str]:
    """A keys file (hashed) for the test tenants, written by the operator CLI; returns tenant -> key."""
    import contextlib
    import io

    from serve.tenancy.admin import main as admin

    keys = {}
    for tenant, plan in TENANTS.items():
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert admin(["keys", "create", "--file", str(path), "--tenant", tenant, "--plan", plan]) == 0
        keys[tenant] = out.getvalue().strip()
    return keys


SMALL = {"width": 48, "height": 32, "num_frames": 9, "num_inference_steps": 4, "max_side": 128}


# the tiny 2b again, its Denoiser a replica of 2 ranks (Ulysses: the 2 heads split across a worker actor; gloo), its
# stage deployments an application of their own, like every model's: deployed for tests/integration/test_parallel.py
# only (`with_parallel_model`), so the rest of the session's tests do not share 2 cores with its processes
PARALLEL_MODEL = "cogvideox-tiny-2b-ulysses"
PARALLEL = {"ulysses": 2, "collective_timeout_s": 20, "start_timeout_s": 120}


def with_parallel_model(config):
    """The session's `AppConfig` with PARALLEL_MODEL added to its catalogue."""
    from serve.config import AppConfig

    data = config.model_dump(mode="json")
    data["api"]["api_keys"] = [k.get_secret_value() for k in config.api.api_keys]
    data["models"] = [*data["models"], {**data["model"], "name": PARALLEL_MODEL, "aliases": [], "parallel": PARALLEL}]
    return AppConfig.model_validate(data)

I2V_MODEL = "cogvideox-tiny-5b-i2v"
I2V_SMALL = {"width": 48, "height": 32, "num_frames": 9, "num_inference_steps": 4}  # the tiny variant's native size


# the second model's Enhancer (tiny random SR x2 and RIFE): generated directly up to 64 a side, so twice its
# native 48x32 at twice its 8 fps (96x64 at 16 fps) is generated at 48x32 and enhanced
ENHANCED_MODEL = "cogvideox-tiny-5b"
ENHANCED = {"size": "96x64", "fps": 16}


def app_config(model_dir: Path, endpoint: str, bucket: str, keys_file: Path | None = None,
               webhook_hosts: list[str] = (), second_model_dir: Path | None = None, i2v_model_dir: Path | None = None,
               enhance_dirs: tuple[Path, Path] | None = None):
    from serve.config import AppConfig

    zero_cpu = {"ray_actor_options": {"num_cpus": 0}, "num_replicas": 1}
    return AppConfig.model_validate({
        "model": {"name": "cogvideox-tiny-2b", "source": str(model_dir), "family": "cogvideox-2b",
                  "device": "cpu", "defaults": SMALL, "aliases": ["cogvideox-flash"]},  # a Zhipu model name
        # a second model, with its own three stage deployments: requests pick it by name; its denoiser
        # has a step cache that requests with quality="speed" use (the tiny weights need a high threshold)
        "models": ([{"name": ENHANCED_MODEL, "source": str(second_model_dir), "family": "cogvideox-5b",
                    "device": "cpu", "defaults": {**SMALL, "max_side": 64},
                    "accel": {"cache": "first_block", "first_block": {"threshold": 0.5}},
                    "enhance": {"sr": {"source": str(enhance_dirs[0]), "scale": 2},
                                "interpolation": {"source": str(enhance_dirs[1])}} if enhance_dirs else None,
                    }] if second_model_dir else [])
        # image-to-video (a picture and a prompt), its own three stage deployments too
        + ([{"name": I2V_MODEL, "source": str(i2v_model_dir), "family": "cogvideox-5b-i2v", "device": "cpu",
             "defaults": I2V_SMALL}] if i2v_model_dir else []),
        "s3": {"bucket": bucket, "endpoint_url": endpoint, "create_bucket": True},
        "api": {"api_keys": [API_KEY]},
        "keys": {"keys_file": str(keys_file) if keys_file else None, "allow_legacy_keys": True,
                 "legacy_plan": "it"},
        "plans": {"plans": PLANS},
        "webhooks": {"enabled": True, "allow_hosts": list(webhook_hosts), "require_https": False,
                     "base_backoff_s": 0.2, "max_backoff_s": 1},
        # CPU run: bill replica-seconds as if each stage held one device, so usage and quotas are non-zero
        "usage": {"gpus_per_stage": {"text_encoder": 1, "denoiser": 1, "vae_decoder": 1, "enhancer": 1}},
        "jobs": {"lease_s": 6, "heartbeat_s": 1, "reclaim_interval_s": 2, "retry_backoff_s": 0.5,
                 "max_attempts": 3, "progress_interval_s": 0, "max_concurrent_per_replica": 4},
        "deployments": {
            "ingress": {**zero_cpu, "max_ongoing_requests": 64, "graceful_shutdown_timeout_s": 5},
            "text_encoder": {**zero_cpu, "graceful_shutdown_timeout_s": 5},
            "denoiser": {**zero_cpu, "graceful_shutdown_timeout_s": 5},
            "vae_decoder": {**zero_cpu, "graceful_shutdown_timeout_s": 5},
            "enhancer": {**zero_cpu, "graceful_shutdown_timeout_s": 5},
        },
    })


# the I2V model's Denoiser scales on its model's backlog (deployments/autoscaling.py), quickly both ways, so the
# autoscaling test sees it grow and shrink within a test's time (the other models' stages keep one replica)
I2V_DENOISER_AUTOSCALING = {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 1,
                            "upscale_delay_s": 0, "downscale_delay_s": 3,
                            "policy": {"policy_function": "deployments.autoscaling:BacklogPolicy"}}


def with_backlog_autoscaling(config: dict) -> dict:
    for app in config["applications"]:
        if app["name"] == f"model-{I2V_MODEL}":
            for d in app["deployments"]:
                if d["name"] == "Denoiser":
                    d.pop("num_replicas", None)
                    d["autoscaling_config"] = dict(I2V_DENOISER_AUTOSCALING)
    return config


class Cluster:
    """The running app: deploy/redeploy it, and reach S3 and Ray for assertions."""

    def __init__(self, config, port: int, keys: dict[str, str], webhooks: "WebhookReceiver") -> None:
        self.config = config
        self.base = f"http://127.0.0.1:{port}"
        self.keys = keys
        self.webhooks = webhooks

    def serve_config(self, config=None) -> dict:
        """The Serve config file of `config` (default: the session's): one application per model + ingress."""
        from deployments.serve_config import serve_config

        return with_backlog_autoscaling(serve_config(config or self.config))

    def deploy(self, serve_config: dict | None = None) -> None:
        """Deploy (or redeploy) declaratively, as `serve deploy` and KubeRay do, and wait until ready."""
        from deployments.local import deploy

        deploy(serve_config or self.serve_config())
        wait_ready(self.base, 180)

    def shutdown_app(self) -> None:
        """Delete every application (the ingress and each model's stages): a full restart follows."""
        from ray import serve

        for name in list(serve.status().applications):
            serve.delete(name)

    @property
    def storage(self):
        from serve.storage import Storage

        return Storage.from_config(self.config.s3)


class WebhookReceiver:
    """A webhook endpoint on 127.0.0.1 that records what it is sent (allow-listed in the app config)."""

    def __init__(self) -> None:
        import http.server
        import threading

        received = self.received = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                received.append({"path": self.path, "headers": dict(self.headers), "body": body})
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://{self.host}{path}"

    def for_path(self, path: str) -> list[dict]:
        return [r for r in self.received if r["path"] == path]

    def close(self) -> None:
        self._server.shutdown()


@pytest.fixture(scope="session")
def cluster(s3_server, tmp_path_factory):
    import ray
    from ray import serve

    from serve.models.tiny import write_tiny_model
    from serve.webhooks.signing import generate_secret

    root = tmp_path_factory.mktemp("it")
    model_dir = write_tiny_model("2b", root / "tiny-2b")
    second_model_dir = write_tiny_model("5b", root / "tiny-5b")
    i2v_model_dir = write_tiny_model("5b-i2v", root / "tiny-5b-i2v")
    from serve.models.tiny_enhance import write_tiny_rife, write_tiny_sr

    enhance_dirs = (write_tiny_sr(root / "tiny-sr-x2", scale=2), write_tiny_rife(root / "tiny-rife"))
    keys = write_keys(root / "keys.json")
    receiver = WebhookReceiver()
    os.environ.setdefault("VIDEOGEN_WEBHOOK_SECRET", generate_secret())
    config = app_config(model_dir, s3_server, "videogen-it", root / "keys.json", [receiver.host], second_model_dir,
                        i2v_model_dir, enhance_dirs)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k.startswith(("AWS_", "HF_", "VIDEOGEN_"))}
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env},
             log_to_driver=bool(os.environ.get("VIDEOGEN_TEST_RAY_LOGS")))
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    c = Cluster(config, port, keys, receiver)
    c.deploy()
    yield c
    serve.shutdown()
    ray.shutdown()
    receiver.close()


@pytest.fixture
def client(cluster):
    from openai import OpenAI

    return OpenAI(base_url=f"{cluster.base}/v1", api_key=API_KEY, max_retries=0, timeout=60)
