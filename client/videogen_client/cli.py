"""`videogen`: the command line for people, over the public HTTP API (through `videogen_client.api` only).

    videogen generate "a red fox in the snow" --out fox.mp4 --seed 7
    videogen generate "the fox starts running" --image fox.png --model cogvideox-tiny-5b-i2v
    videogen jobs list | show ID | cancel ID | delete ID | download ID --out f.mp4
    videogen usage --start 2025-01-01

Exit codes: 0 done, 1 an API error or a job that did not complete, 2 a usage error (flags, no API key),
130 interrupted (a submitted job keeps running on the server).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from datetime import date, datetime
from pathlib import Path
from typing import Any, TextIO

import httpx

from videogen_client.api import (
    DEFAULT_BASE_URL,
    MAX_IMAGE_BYTES,
    ClientError,
    ServerUnreachable,
    Video,
    VideogenClient,
    image_media_type,
)

ENV_BASE_URL = "VIDEOGEN_BASE_URL"
ENV_API_KEY = "VIDEOGEN_API_KEY"
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


# -- progress ----------------------------------------------------------------------------------------

def _elapsed(seconds: float) -> str:
    s = int(seconds)
    return f"{s}s" if s < 60 else f"{s // 60}m{s % 60:02d}s"


class ProgressView:
    """One live line on a terminal (redrawn with \\r); on a pipe or log, a plain line per change of stage and
    about every tenth of the denoising steps, so logs stay short for 50-step jobs."""

    def __init__(self, stream: TextIO, tty: bool, clock: Callable[[], float] = time.monotonic,
                 bar_width: int = 24) -> None:
        self._stream = stream
        self._tty = tty
        self._clock = clock
        self._start = clock()
        self._bar_width = bar_width
        self._drawn = 0  # length of the live line on a terminal
        self._last_key: tuple[str, str | None] | None = None
        self._last_step = -1

    def render(self, v: Video) -> str:
        elapsed = _elapsed(self._clock() - self._start)
        if v.status == "queued":
            return f"queued  {elapsed}"
        if v.status == "completed":
            return f"done  100%  {elapsed}"
        if v.status in ("failed", "cancelled"):
            return f"{v.status}  {elapsed}"
        stage = {None: "in progress", "queued": "starting"}.get(v.stage, v.stage)
        if v.stage == "denoising" and v.total_steps:
            step = min(max(v.step or 0, 0), v.total_steps)
            filled = round(self._bar_width * step / v.total_steps)
            bar = "#" * filled + "-" * (self._bar_width - filled)
            return f"denoising [{bar}] step {step}/{v.total_steps}  {v.progress}%  {elapsed}"
        return f"{stage}  {v.progress}%  {elapsed}"

    def update(self, v: Video) -> None:
        line = self.render(v)
        if self._tty:
            self._stream.write("\r" + line.ljust(self._drawn))
            self._drawn = len(line)
        elif self._should_print(v):
            self._stream.write(line + "\n")
        self._stream.flush()

    def _should_print(self, v: Video) -> bool:
        key = (v.status, v.stage)
        step = v.step or 0
        if key != self._last_key:
            self._last_key, self._last_step = key, step
            return True
        if v.stage != "denoising" or not v.total_steps or step == self._last_step:
            return False
        stride = max(1, v.total_steps // 10)
        if step - self._last_step >= stride or step >= v.total_steps:
            self._last_step = step
            return True
        return False

    def end(self) -> None:
        """Leave the live line in place and move below it."""
        if self._tty and self._drawn:
            self._stream.write("\n")
            self._stream.flush()
            self._drawn = 0


# -- output ------------------------------------------------------------------------------------------

def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=False))


def _when(ts: int | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _show(v: Video) -> None:
    rows: list[tuple[str, Any]] = [
        ("id", v.id), ("status", v.status), ("progress", f"{v.progress}%"),
        ("stage", v.stage), ("step", f"{v.step}/{v.total_steps}" if v.total_steps else None),
        ("model", v.model), ("prompt", v.prompt), ("size", v.size), ("seconds", v.seconds),
        ("frames", v.num_frames), ("fps", v.fps), ("seed", v.seed),
        ("created", _when(v.created_at)), ("completed", _when(v.completed_at) if v.completed_at else None),
        ("error", f"{v.error.message} ({v.error.code})" if v.error else None),
        ("video_url", v.video_url), ("thumbnail_url", v.thumbnail_url),
    ]
    for name, value in rows:
        if value is not None:
            print(f"{name + ':':<15}{value}")


def _print_usage(data: Any, indent: int = 0) -> None:
    """The usage report's shape belongs to the server: print any JSON as indented `key: value` lines."""
    pad = "  " * indent
    if isinstance(data, dict):
        for key, value in data.items():
            if isinstance(value, (dict, list)):
                print(f"{pad}{key}:")
                _print_usage(value, indent + 1)
            else:
                print(f"{pad}{key}: {value}")
    elif isinstance(data, list):
        for item in data:
            if isinstance(item, dict):
                print(f"{pad}-")
                _print_usage(item, indent + 1)
            else:
                print(f"{pad}- {item}")
    else:
        print(f"{pad}{data}")


def _err(message: str) -> None:
    print(message, file=sys.stderr)


def _read_image(path_text: str) -> tuple[str, bytes, str]:
    """The `--image` file as `(filename, bytes, media type)`, or a usage error naming the path; nothing is sent."""
    path = Path(path_text)
    cap = f"{MAX_IMAGE_BYTES // (1024 * 1024)} MiB"
    try:
        if path.is_dir():
            raise argparse.ArgumentTypeError(f"--image {path_text}: is a directory, not an image file")
        size = path.stat().st_size
        if size > MAX_IMAGE_BYTES:
            raise argparse.ArgumentTypeError(
                f"--image {path_text}: {size} bytes is over the {cap} limit of an input image "
                "(the server may have its own, lower cap); make it smaller")
        with path.open("rb") as f:
            data = f.read(MAX_IMAGE_BYTES + 1)  # a file that grew, or a pipe, is still bounded
    except FileNotFoundError:
        raise argparse.ArgumentTypeError(f"--image {path_text}: no such file") from None
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"--image {path_text}: cannot read it: {exc.strerror or exc}") from None
    if len(data) > MAX_IMAGE_BYTES:
        raise argparse.ArgumentTypeError(f"--image {path_text}: over the {cap} limit of an input image "
                                         "(the server may have its own, lower cap); make it smaller")
    if not data:
        raise argparse.ArgumentTypeError(f"--image {path_text}: the file is empty")
    return path.name, data, image_media_type(data)


# -- commands ----------------------------------------------------------------------------------------

def cmd_generate(client: VideogenClient, args: argparse.Namespace) -> int:
    image = None if args.image is None else _read_image(args.image)  # before any request
    options = {
        "model": args.model, "size": args.size, "seconds": None if args.seconds is None else f"{args.seconds:g}",
        "num_frames": args.frames, "fps": args.fps, "num_inference_steps": args.steps,
        "guidance_scale": args.guidance, "seed": args.seed, "negative_prompt": args.negative,
        "use_dynamic_cfg": args.dynamic_cfg, "image_fit": args.image_fit,
    }
    try:
        video = client.create(args.prompt, webhook_url=args.webhook_url, image=image, **options)
    except KeyboardInterrupt:
        _err("\ninterrupted before the server answered; the job may exist: videogen jobs list")
        return EXIT_INTERRUPTED
    if args.no_wait:
        if args.json:
            _print_json(video.raw)
        else:
            print(video.id)
            _err(f"submitted {video.id} ({video.status}); follow it with: videogen jobs show {video.id}")
        return EXIT_OK

    quiet = args.quiet
    if not quiet:
        _err(f"submitted {video.id}")
    view = ProgressView(sys.stderr, tty=sys.stderr.isatty())
    try:
        for video in client.poll(video.id):
            if not quiet:
                view.update(video)
    except KeyboardInterrupt:
        view.end()
        _err(f"\ninterrupted: job {video.id} keeps running on the server.\n"
             f"  check it:   videogen jobs show {video.id}\n"
             f"  cancel it:  videogen jobs cancel {video.id}")
        return EXIT_INTERRUPTED
    except (ClientError, ServerUnreachable) as exc:
        view.end()
        _err(f"error: {exc}\njob {video.id} may still be running: videogen jobs show {video.id}")
        return EXIT_ERROR
    view.end()

    if video.status != "completed":
        if args.json:
            _print_json(video.raw)
        reason = f"{video.error.message} ({video.error.code})" if video.error else "no reason given"
        _err(f"error: job {video.id} {video.status}: {reason}")
        return EXIT_ERROR

    out = args.out or f"{video.id}.mp4"
    try:
        path = client.download(video.id, out)
    except KeyboardInterrupt:
        _err(f"\ninterrupted: job {video.id} is done; download it with: videogen jobs download {video.id} "
             f"--out {out}")
        return EXIT_INTERRUPTED
    if args.json:
        _print_json({**video.raw, "output_path": str(path)})
    else:
        print(f"saved {path} (job {video.id})")
    return EXIT_OK


def cmd_jobs_list(client: VideogenClient, args: argparse.Namespace) -> int:
    page = client.list(limit=args.limit, after=args.after)
    if args.json:
        _print_json(page.raw)
        return EXIT_OK
    if not page.data:
        print("no jobs")
        return EXIT_OK
    print(f"{'ID':<34}  {'STATUS':<11}  {'PROG':>4}  {'CREATED':<19}  {'SIZE':<9}  PROMPT")
    for v in page.data:
        prompt = (v.prompt or "").replace("\n", " ")
        prompt = prompt if len(prompt) <= 40 else prompt[:39] + "…"
        print(f"{v.id:<34}  {v.status:<11}  {v.progress:>3}%  {_when(v.created_at):<19}  {v.size or '-':<9}  "
              f"{prompt}")
    if page.has_more:
        print(f"more: videogen jobs list --after {page.last_id}")
    return EXIT_OK


def cmd_jobs_show(client: VideogenClient, args: argparse.Namespace) -> int:
    video = client.get(args.id)
    if args.json:
        _print_json(video.raw)
    else:
        _show(video)
    return EXIT_OK


def cmd_jobs_cancel(client: VideogenClient, args: argparse.Namespace) -> int:
    video = client.cancel(args.id)
    if video.status == "cancelled":
        print(f"cancelled {video.id}")
    else:
        print(f"cancel requested for {video.id} (now {video.status}); it stops at the next denoising step")
    return EXIT_OK


def cmd_jobs_delete(client: VideogenClient, args: argparse.Namespace) -> int:
    client.delete(args.id)
    print(f"deleted {args.id}")
    return EXIT_OK


def cmd_jobs_download(client: VideogenClient, args: argparse.Namespace) -> int:
    variant = "thumbnail" if args.thumbnail else "video"
    out = args.out or f"{args.id}.{'jpg' if args.thumbnail else 'mp4'}"
    path = client.download(args.id, out, variant=variant)
    print(f"saved {path}")
    return EXIT_OK


def cmd_usage(client: VideogenClient, args: argparse.Namespace) -> int:
    today = date.today()
    start = args.start or today.replace(day=1)
    end = args.end or today
    if start > end:
        raise argparse.ArgumentTypeError(f"--start {start} is after --end {end}")
    report = client.usage(start, end)
    if args.json:
        _print_json(report)
    else:
        print(f"usage {start} .. {end}")
        _print_usage(report, indent=1)
    return EXIT_OK


# -- parser ------------------------------------------------------------------------------------------

def _day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected YYYY-MM-DD, got {text!r}") from None


def _size(text: str) -> str:
    w, sep, h = text.lower().partition("x")
    if not (sep and w.isdigit() and h.isdigit()):
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 720x480, got {text!r}")
    return f"{int(w)}x{int(h)}"


def build_parser() -> argparse.ArgumentParser:
    # connection flags are accepted before or after the command; SUPPRESS keeps a later parser from resetting them
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--base-url", default=argparse.SUPPRESS,
                        help=f"API base URL (env {ENV_BASE_URL}; default {DEFAULT_BASE_URL})")
    common.add_argument("--api-key", default=argparse.SUPPRESS, help=f"API key (env {ENV_API_KEY})")
    common.add_argument("--timeout", type=float, default=argparse.SUPPRESS, help="seconds per request (30)")
    common.add_argument("--retries", type=int, default=argparse.SUPPRESS,
                        help="retries of a request refused with 429/503 or not connected (3)")

    parser = argparse.ArgumentParser(prog="videogen", parents=[common],
                                     description="Text (or image) to video from the command line "
                                                 "(videogen-serve API).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", parents=[common], help="make a video and wait for it")
    gen.add_argument("prompt")
    gen.add_argument("--out", "-o", help="where to save the mp4 (default: ./<id>.mp4)")
    gen.add_argument("--size", type=_size, help="WIDTHxHEIGHT, e.g. 720x480")
    length = gen.add_mutually_exclusive_group()
    length.add_argument("--seconds", type=float, help="clip length in seconds")
    length.add_argument("--frames", type=int, help="number of frames (8N+1; 16N+1 for CogVideoX1.5)")
    gen.add_argument("--fps", type=int)
    gen.add_argument("--steps", type=int, help="denoising steps")
    gen.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    gen.add_argument("--seed", type=int)
    gen.add_argument("--negative", help="negative prompt")
    gen.add_argument("--dynamic-cfg", action=argparse.BooleanOptionalAction, default=None,
                     help="CogVideoX's cosine guidance schedule")
    gen.add_argument("--model")
    gen.add_argument("--image", metavar="PATH",
                     help="a PNG, JPEG or WebP image to start from: makes an image-to-video job, which needs an "
                          "image-to-video model (e.g. --model cogvideox-tiny-5b-i2v locally; GET /v1/models "
                          f"lists each model's inputs, [\"text\", \"image\"] for these). At most "
                          f"{MAX_IMAGE_BYTES // (1024 * 1024)} MiB here; the server may have its own cap")
    gen.add_argument("--image-fit", choices=("stretch", "crop", "pad"),
                     help="with --image: stretch it to the video's size (default, as diffusers does), crop it to "
                          "the video's aspect, or pad it with black bars")
    gen.add_argument("--webhook-url", help="URL the server calls when the job ends")
    gen.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    gen.add_argument("--json", action="store_true", help="print the job as JSON on stdout")
    gen.add_argument("--quiet", "-q", action="store_true", help="no progress line")
    gen.set_defaults(func=cmd_generate)

    jobs = sub.add_parser("jobs", help="list, show, cancel, delete, download jobs")
    jsub = jobs.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")
    ls = jsub.add_parser("list", parents=[common], help="newest first")
    ls.add_argument("--limit", type=int, default=20)
    ls.add_argument("--after", help="id of the last job of the previous page")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_jobs_list)
    show = jsub.add_parser("show", parents=[common], help="one job's status and parameters")
    show.add_argument("id")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=cmd_jobs_show)
    cancel = jsub.add_parser("cancel", parents=[common], help="stop a queued or running job")
    cancel.add_argument("id")
    cancel.set_defaults(func=cmd_jobs_cancel)
    delete = jsub.add_parser("delete", parents=[common], help="delete a job and its files")
    delete.add_argument("id")
    delete.set_defaults(func=cmd_jobs_delete)
    dl = jsub.add_parser("download", parents=[common], help="save a completed job's mp4 or cover")
    dl.add_argument("id")
    dl.add_argument("--out", "-o", help="default: ./<id>.mp4 (./<id>.jpg with --thumbnail)")
    dl.add_argument("--thumbnail", action="store_true", help="the cover JPEG instead of the mp4")
    dl.set_defaults(func=cmd_jobs_download)

    usage = sub.add_parser("usage", parents=[common], help="what was generated in a date range")
    usage.add_argument("--start", type=_day, help="YYYY-MM-DD (default: the 1st of this month)")
    usage.add_argument("--end", type=_day, help="YYYY-MM-DD (default: today)")
    usage.add_argument("--json", action="store_true")
    usage.set_defaults(func=cmd_usage)
    return parser


def main(argv: Sequence[str] | None = None, *, transport: httpx.BaseTransport | None = None) -> int:
    """Run one command; `transport` serves the API in-process (tests)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a flag argparse refused (it printed why): a code, not an exit
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    base_url = getattr(args, "base_url", None) or os.environ.get(ENV_BASE_URL) or DEFAULT_BASE_URL
    api_key = getattr(args, "api_key", None) or os.environ.get(ENV_API_KEY)
    if not api_key:
        _err(f"error: no API key: pass --api-key KEY or set {ENV_API_KEY} "
             "(the local quick start serves sk-local-dev)")
        return EXIT_USAGE
    client = VideogenClient(base_url, api_key, timeout=getattr(args, "timeout", 30.0), transport=transport,
                            max_retries=getattr(args, "retries", 3))
    try:
        return args.func(client, args)
    except ClientError as exc:
        _err(f"error: {exc}")
        if exc.status == 401:
            _err(f"check --api-key / {ENV_API_KEY}")
        return EXIT_ERROR
    except ServerUnreachable as exc:
        _err(f"error: {exc}")
        return EXIT_ERROR
    except argparse.ArgumentTypeError as exc:
        _err(f"error: {exc}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        _err("\ninterrupted")
        return EXIT_INTERRUPTED
    except OSError as exc:  # the output file: no space, no permission
        _err(f"error: {exc}")
        return EXIT_ERROR
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
