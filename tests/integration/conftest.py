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


def app_config(model_dir: Path, endpoint: str, bucket: str):
    from serve.config import AppConfig

    zero_cpu = {"ray_actor_options": {"num_cpus": 0}, "num_replicas": 1}
    return AppConfig.model_validate({
        "model": {"name": "cogvideox-tiny-2b", "source": str(model_dir), "family": "cogvideox-2b",
                  "device": "cpu", "defaults": {"width": 48, "height": 32, "num_frames": 9,
                                                "num_inference_steps": 4, "max_side": 128}},
        "s3": {"bucket": bucket, "endpoint_url": endpoint, "create_bucket": True},
        "api": {"api_keys": [API_KEY]},
        "jobs": {"lease_s": 6, "heartbeat_s": 1, "reclaim_interval_s": 2, "retry_backoff_s": 0.5,
                 "max_attempts": 3, "progress_interval_s": 0},
        "deployments": {
            "ingress": {**zero_cpu, "max_ongoing_requests": 64, "graceful_shutdown_timeout_s": 5},
            "text_encoder": {**zero_cpu, "graceful_shutdown_timeout_s": 5},
            "denoiser": {**zero_cpu, "graceful_shutdown_timeout_s": 5},
            "vae_decoder": {**zero_cpu, "graceful_shutdown_timeout_s": 5},
        },
    })


class Cluster:
    """The running app: deploy/redeploy it, and reach S3 and Ray for assertions."""

    def __init__(self, config, port: int) -> None:
        self.config = config
        self.base = f"http://127.0.0.1:{port}"

    def deploy(self) -> None:
        from ray import serve

        from deployments.app import build_app

        serve.run(build_app(self.config), name="videogen", route_prefix="/", blocking=False)
        wait_ready(self.base, 180)

    def shutdown_app(self) -> None:
        from ray import serve

        serve.delete("videogen")

    @property
    def storage(self):
        from serve.storage import Storage

        return Storage.from_config(self.config.s3)


@pytest.fixture(scope="session")
def cluster(s3_server, tmp_path_factory):
    import ray
    from ray import serve

    from serve.models.tiny import write_tiny_model

    model_dir = write_tiny_model("2b", tmp_path_factory.mktemp("models") / "tiny-2b")
    config = app_config(model_dir, s3_server, "videogen-it")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k.startswith(("AWS_", "HF_"))}
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env},
             log_to_driver=bool(os.environ.get("VIDEOGEN_TEST_RAY_LOGS")))
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    c = Cluster(config, port)
    c.deploy()
    yield c
    serve.shutdown()
    ray.shutdown()


@pytest.fixture
def client(cluster):
    from openai import OpenAI

    return OpenAI(base_url=f"{cluster.base}/v1", api_key=API_KEY, max_retries=0, timeout=60)
