"""Where model weights come from: turns a configured model source into something `from_pretrained`
accepts, before any stage loads (serve/stages/*.from_pretrained take the result).

Three kinds of source:
  * a local directory in diffusers layout -> returned as is (after checking `model_index.json`);
  * `s3://bucket/prefix` -> every object under the prefix is downloaded once into
    `<cache_dir>/s3/<bucket>/<prefix>/` and that directory is returned;
  * a Hugging Face id (`org/name`) -> returned unchanged; `from_pretrained` downloads it, or reads
    the local HF cache when `HF_HUB_OFFLINE=1`.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from pathlib import Path, PurePosixPath

logger = logging.getLogger(__name__)

# Written last into a finished download; its presence means the directory is complete.
COMPLETE_MARKER = ".download-complete"

_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_LOCAL_PREFIXES = ("/", "./", "../", "~", "file://")


class ModelSourceError(ValueError):
    """The model source cannot be used; the message says what to fix."""


def resolve_model_source(
    source: str, cache_dir: str, s3_client=None, revision: str | None = None
) -> str:
    """Return a local directory or a Hugging Face id for `source` (see the module docstring).

    `s3_client` is a boto3 S3 client (one is created with default credentials when None);
    `revision` only means something for Hugging Face ids and is ignored otherwise.
    """
    source = source.strip()
    if not source:
        raise ModelSourceError("model source is empty: give a local directory, s3://bucket/prefix or a HF id")
    if source.startswith("s3://"):
        _ignore_revision(source, revision)
        return str(download_s3_prefix(source, Path(cache_dir), s3_client))

    local = Path(source.removeprefix("file://")).expanduser()
    if local.is_dir() or source.startswith(_LOCAL_PREFIXES):
        _ignore_revision(source, revision)
        check_model_dir(local, source)
        return str(local)
    if _HF_ID.match(source):
        return source
    raise ModelSourceError(
        f"model source {source!r} is neither an existing directory, an s3://bucket/prefix URL nor a "
        "Hugging Face id like 'THUDM/CogVideoX-2b'"
    )


def check_model_dir(path: Path, source: str | None = None) -> None:
    """Raise `ModelSourceError` unless `path` is a diffusers model directory."""
    shown = source or str(path)
    if not path.is_dir():
        raise ModelSourceError(f"model directory {shown!r} does not exist (resolved to {path})")
    if not (path / "model_index.json").is_file():
        raise ModelSourceError(
            f"model directory {shown!r} has no model_index.json: point at the root of a diffusers "
            "pipeline (with text_encoder/, tokenizer/, transformer/, vae/, scheduler/), e.g. one "
            "written by `python -m serve.models.tiny` or `pipe.save_pretrained(...)`"
        )


def parse_s3_url(url: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix/` -> (`bucket`, `some/prefix`)."""
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    prefix = prefix.strip("/")
    if not bucket or not prefix:
        raise ModelSourceError(f"S3 model source {url!r} must look like s3://bucket/prefix (both parts non-empty)")
    return bucket, prefix


def download_s3_prefix(url: str, cache_dir: Path, s3_client=None) -> Path:
    """Download every object under `url` into `<cache_dir>/s3/<bucket>/<prefix>/`, once.

    Downloads go to a temporary sibling directory that is renamed into place when complete, so a
    crash never leaves a half-written model that looks finished, and concurrent downloaders of the
    same prefix (several replicas on one node) end with one intact copy.
    """
    bucket, prefix = parse_s3_url(url)
    target = cache_dir / "s3" / bucket / prefix
    if (target / COMPLETE_MARKER).is_file():
        return target
    if s3_client is None:
        import boto3

        s3_client = boto3.client("s3")

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        count = _download_objects(s3_client, bucket, prefix, tmp, url)
        if count == 0:
            raise ModelSourceError(f"no objects under {url}: check the bucket and prefix")
        check_model_dir(tmp, url)
        (tmp / COMPLETE_MARKER).write_text(f"{url}\n{count} objects\n")
        if target.exists() and not (target / COMPLETE_MARKER).is_file():
            shutil.rmtree(target)  # left over from a download without the marker: not trusted
        try:
            tmp.rename(target)
        except OSError:
            if not (target / COMPLETE_MARKER).is_file():
                raise
            # Another process finished first; its copy is as good as ours.
        logger.info("downloaded %d objects from %s to %s", count, url, target)
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _download_objects(s3_client, bucket: str, prefix: str, dest: Path, url: str) -> int:
    from botocore.exceptions import BotoCoreError, ClientError

    count = 0
    try:
        # The trailing "/" keeps s3://b/models/a from also matching models/ab/...
        pages = s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
        for page in pages:
            for obj in page.get("Contents", []):
                key = obj["Key"]
                relative = PurePosixPath(key[len(prefix) + 1 :])
                if key.endswith("/") or not relative.parts:
                    continue  # "directory" placeholder objects
                if ".." in relative.parts:
                    raise ModelSourceError(f"refusing S3 key {key!r} under {url}: it escapes the prefix")
                path = dest.joinpath(*relative.parts)
                path.parent.mkdir(parents=True, exist_ok=True)
                s3_client.download_file(bucket, key, str(path))
                count += 1
    except (BotoCoreError, ClientError) as e:
        raise ModelSourceError(f"could not download {url}: {e} (check the bucket name, prefix and credentials)") from e
    return count


def _ignore_revision(source: str, revision: str | None) -> None:
    if revision is not None:
        logger.warning("revision %r ignored for %s: revisions apply to Hugging Face ids only", revision, source)


def resolve_weights_source(source: str, cache_dir: str, s3_client=None, revision: str | None = None) -> str:
    """A local file or directory of plain weights (the Enhancer's SR and RIFE models, which have no diffusers
    layout): a local path as it is, an s3:// prefix downloaded once into `cache_dir`, a Hugging Face id fetched
    with `huggingface_hub.snapshot_download` (from its cache when offline)."""
    source = source.strip()
    if source.startswith("s3://"):
        _ignore_revision(source, revision)
        return str(download_s3_prefix(source, Path(cache_dir), s3_client))
    local = Path(source.removeprefix("file://")).expanduser()
    if local.exists() or source.startswith(_LOCAL_PREFIXES):
        if not local.exists():
            raise ModelSourceError(f"weights {source!r} do not exist (resolved to {local})")
        return str(local)
    if _HF_ID.match(source):
        from huggingface_hub import snapshot_download

        return snapshot_download(source, revision=revision, cache_dir=cache_dir)
    raise ModelSourceError(f"weights source {source!r} is neither an existing path, an s3://bucket/prefix URL nor "
                           f"a Hugging Face id")
