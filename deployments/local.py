"""The local quick start: tiny models + moto S3 + local Ray + the Serve app, then one sample video of each kind.

    python -m deployments.local [--config configs/local.yaml] [--prompt "..."] [--no-wait]

Writes the tiny models if missing, starts moto's S3 server on 127.0.0.1:9000 (unless something already
answers there), starts the app on http://127.0.0.1:8000, submits a prompt through the HTTP API, waits, then
asks for the same at twice the size and fps (the Enhancer's super-resolution and interpolation) and (when an
image-to-video model is served) animates the first video's cover with a second prompt, prints the S3 URIs and
the downloaded mp4 paths, and keeps serving until Ctrl-C.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from deployments.serve_config import check_serve_config, normalised

log = logging.getLogger("videogen.local")


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def wait_ready(base: str, timeout_s: float) -> None:
    """Poll `/readyz` until 200 (models loaded, S3 reachable) or fail with the last answer."""
    deadline = time.time() + timeout_s
    last = ""
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{base}/readyz", timeout=10) as resp:
                if resp.status == 200:
                    return
        except urllib.error.HTTPError as exc:
            last = exc.read().decode(errors="replace")
        except OSError as exc:
            last = str(exc)
        time.sleep(0.5)
    raise TimeoutError(f"the app did not become ready in {timeout_s:.0f} s: {last}")


def deploy(serve_config: dict[str, Any], timeout_s: float = 300) -> None:
    """Deploy a Serve config file's applications as `serve deploy` does (declaratively, one goal state), on
    the Serve instance this process started: its `args` decide each application's code version, so
    deploying a changed file updates running replicas in place wherever Serve can (no dashboard needed).
    `serve.run` would instead give every call a new code version and restart every replica."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate({"applications": normalised(serve_config)["applications"]})
    client = _get_global_client()
    client.deploy_apps(schema)
    deadline = time.time() + timeout_s
    names = {a.name for a in schema.applications}
    while time.time() < deadline:  # the controller builds the applications in the background
        apps = serve.status().applications
        states = {n: apps[n].status for n in names if n in apps}
        if any(s == "DEPLOY_FAILED" for s in states.values()):
            failed = {n: apps[n].message for n, s in states.items() if s == "DEPLOY_FAILED"}
            raise RuntimeError(f"deploy failed: {failed}")
        if len(states) == len(names) and all(s == "RUNNING" for s in states.values()):
            return
        time.sleep(0.5)
    raise TimeoutError(f"applications {sorted(names)} not running after {timeout_s:.0f} s")


def _sample(client, out: Path, prompt: str, **options):
    """One video through the public API (submit, poll, download); (None, None) when it did not complete."""
    video = client.create(prompt, **options)
    log.info("submitted %s (%s)", video.id, video.model)
    for video in client.poll(video.id):
        log.info("%s: %s %s%%", video.id, video.status, video.progress)
    if video.status != "completed":
        print(f"job {video.id} ended {video.status}: {video.error}", file=sys.stderr)
        return None, None
    return video, client.download(video.id, out / f"{video.id}.mp4")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/local.yaml")
    parser.add_argument("--prompt", default="A golden retriever runs along a beach at sunset, waves rolling in")
    parser.add_argument("--out", default="out", help="Where the downloaded mp4 goes.")
    parser.add_argument("--no-wait", action="store_true", help="Exit after the sample video instead of serving.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    serve_cfg = __import__("yaml").safe_load(Path(args.config).read_text())
    app_cfg = check_serve_config(serve_cfg)
    http = serve_cfg.get("http_options", {})
    host, port = http.get("host", "127.0.0.1"), int(http.get("port", 8000))
    base = f"http://{host}:{port}"
    key = app_cfg.api.api_keys[0].get_secret_value()

    # 1. The tiny model, in the diffusers layout, loaded later through from_pretrained like real weights
    from serve.models.tiny import ensure_tiny_model
    from serve.models.tiny_enhance import ensure_tiny_enhance

    for model in app_cfg.all_models():
        source = Path(model.source)
        if source.name.startswith("tiny-"):  # a local tiny model is written if missing; real sources are used as is
            ensure_tiny_model(source.name.removeprefix("tiny-"), source)
        if model.enhance is not None:  # and its tiny SR and RIFE weights (tiny-sr-x2, tiny-rife)
            for weights in (model.enhance.sr, model.enhance.sr_fast, model.enhance.interpolation):
                if weights is not None and Path(weights.source).name.startswith("tiny-"):
                    ensure_tiny_enhance(Path(weights.source))

    # 2. Local S3 (moto server mode) unless one already answers at the endpoint
    from serve.local_s3 import LocalS3Server

    s3_server = None
    endpoint = urlparse(app_cfg.s3.endpoint_url or "")
    if endpoint.hostname in ("127.0.0.1", "localhost") and not _port_open(endpoint.hostname, endpoint.port or 80):
        s3_server = LocalS3Server(port=endpoint.port or 9000)
        s3_server.start()
        log.info("local S3 (moto) at %s", app_cfg.s3.endpoint_url)

    # 3. Ray + Serve
    import ray
    from ray import serve

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, ignore_reinit_error=True,
             runtime_env={"env_vars": {k: v for k, v in os.environ.items()
                                       if k.startswith(("AWS_", "HF_")) or k == "VIDEOGEN_MODEL_CACHE"}})
    serve.start(http_options={**http, "host": host, "port": port})  # the file's timeouts too
    deploy(serve_cfg)  # one application per model beside the ingress, as on a cluster
    wait_ready(base, 300)
    log.info("API at %s/v1 (key %s)", base, key)

    # 4. One sample video through the public HTTP API, with the project's own client
    from videogen_client.api import VideogenClient

    out = Path(args.out)
    i2v = next((m for m in app_cfg.all_models() if m.preset().image_input), None)
    with VideogenClient(f"{base}/v1", key, timeout=60) as client:
        video, mp4 = _sample(client, out, args.prompt)
        if video is None:
            return 1
        made = [(video, mp4)]
        enhance = app_cfg.model.enhance
        if enhance is not None and enhance.size_factors() and enhance.fps_factors():
            # twice the native size and fps: generated natively, then upscaled and interpolated by the Enhancer
            p = app_cfg.model.preset()
            video, mp4 = _sample(client, out, args.prompt, size=f"{2 * p.width}x{2 * p.height}", fps=2 * p.fps)
            if video is None:
                return 1
            made.append((video, mp4))
        if i2v is not None:  # image-to-video: the first video's cover and a prompt become a second video
            cover = client.download(video.id, out / f"{video.id}.jpg", variant="thumbnail")
            video, mp4 = _sample(client, out, "the scene comes alive", image=cover, model=i2v.name)
            if video is None:
                return 1
            made.append((video, mp4))
    prefix = app_cfg.s3.prefix
    for video, mp4 in made:
        print(f"\n{video.model} {video.size} at {video.fps} fps: s3://{app_cfg.s3.bucket}/{prefix}videos/{video.id}.mp4")
        print(f"local mp4: {mp4.resolve()}")
    print("(a tiny random model draws noise; see README for real CogVideoX weights)")
    if args.no_wait:
        serve.shutdown()
        return 0
    print(f"\nserving at {base}/v1 with key {key}; Ctrl-C to stop")
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        if s3_server is not None:
            s3_server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
