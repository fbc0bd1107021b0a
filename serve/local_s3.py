"""A local S3 (moto's server on 127.0.0.1) for tests and the local quick start; never used in production.

`Storage` talks to it through `S3Config.endpoint_url`, exactly as it talks to AWS, so the job store and uploads run
the same code locally. Run it in the foreground with `python -m serve.local_s3 --port 9000`.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterable
from typing import Any

from moto.server import ThreadedMotoServer

logger = logging.getLogger(__name__)

_DUMMY_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
}


def use_dummy_credentials() -> None:
    """Give boto3 something to sign with against moto (it accepts any key); existing values are kept."""
    for name, value in _DUMMY_ENV.items():
        os.environ.setdefault(name, value)


class _SerializedWrites:
    """WSGI middleware: one mutating request at a time.

    moto checks If-Match / If-None-Match and then stores the object without a lock (s3/responses.py put_object), so
    two concurrent conditional PUTs could in principle both pass. Real S3 makes the check and the write atomic; the
    job store's leases rely on that, so the local server serializes writes to behave the same. Reads stay parallel.
    """

    _MUTATING = frozenset({"PUT", "POST", "DELETE"})

    def __init__(self, app: Callable[..., Any]) -> None:
        self._app = app
        self._lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD") not in self._MUTATING:
            return self._app(environ, start_response)
        with self._lock:
            # Materialize the response inside the lock: the write happens while the app runs.
            result = self._app(environ, start_response)
            try:
                return list(result)
            finally:
                if hasattr(result, "close"):
                    result.close()


class _AtomicMotoServer(ThreadedMotoServer):
    middleware: Callable[[Callable[..., Any]], Callable[..., Any]] | None = None

    def _server_entry(self) -> None:  # same as moto's, with the write lock around the app
        from moto.moto_server.werkzeug_app import (
            DomainDispatcherApplication,
            MotoRequestHandler,
            create_backend_app,
        )
        from werkzeug.serving import make_server

        app = _SerializedWrites(DomainDispatcherApplication(create_backend_app))
        if self.middleware is not None:  # e.g. the serving benchmark's request counter
            app = self.middleware(app)
        self._server = make_server(self._ip_address, self._port, app, True, request_handler=MotoRequestHandler)
        self._server_ready_event.set()
        self._server.serve_forever()


class LocalS3Server:
    """moto's S3 in a background thread. `port=0` picks a free port; `endpoint_url` says which."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1", quiet: bool = True,
                 middleware: Callable[[Callable[..., Any]], Callable[..., Any]] | None = None) -> None:
        """`middleware` wraps moto's WSGI app (it sees every request first)."""
        self.host = host
        self.port = port
        self._middleware = middleware
        self._quiet = quiet
        self._server: ThreadedMotoServer | None = None

    @property
    def endpoint_url(self) -> str:
        if self._server is None:
            raise RuntimeError("LocalS3Server is not started")
        host, port = self._server.get_host_and_port()
        return f"http://{host}:{port}"

    def start(self) -> str:
        if self._server is not None:
            return self.endpoint_url
        use_dummy_credentials()
        if self._quiet:
            # werkzeug logs every request at INFO; thousands of lines in a test run.
            logging.getLogger("werkzeug").setLevel(logging.WARNING)
        # Bind loopback explicitly: ThreadedMotoServer's default is 0.0.0.0.
        self._server = _AtomicMotoServer(ip_address=self.host, port=self.port, verbose=False)
        self._server.middleware = self._middleware
        self._server.start()
        logger.info("local S3 (moto) at %s", self.endpoint_url)
        return self.endpoint_url

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def __enter__(self) -> LocalS3Server:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run a local S3 (moto) in the foreground until Ctrl-C.")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--host", default="127.0.0.1", help="Address to bind (default: loopback only).")
    parser.add_argument("--verbose", action="store_true", help="Log every request.")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    stop = threading.Event()
    # Ctrl-C and SIGTERM (docker stop, kill) both end it cleanly; handling SIGINT ourselves also works when a
    # non-interactive shell started us in the background with SIGINT ignored.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server = LocalS3Server(port=args.port, host=args.host, quiet=not args.verbose)
    url = server.start()
    print(f"local S3 at {url} (set s3.endpoint_url: {url}); Ctrl-C to stop", flush=True)
    try:
        stop.wait()
    finally:
        server.stop()


if __name__ == "__main__":
    main()
