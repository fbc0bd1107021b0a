"""Operator CLI for the keys file that `serve.tenancy.keys.KeyRing` reads: create, list and revoke API keys.

    python -m serve.tenancy.admin keys create --file keys.json --tenant acme --plan pro [--label ci]
    python -m serve.tenancy.admin keys list   --file keys.json [--json]
    python -m serve.tenancy.admin keys revoke --file keys.json KEY_ID

`create` prints the new key, alone, on stdout (so `KEY=$(... keys create ...)` works) and is the only time it
is ever shown; everything else goes to stderr. In production the file is then published as a Kubernetes
Secret (`kubectl create secret generic videogen-keys --from-file=keys.json --dry-run=client -o yaml | kubectl
apply -f -`); the ingress picks the change up within seconds. Set `VIDEOGEN_KEY_PEPPER` exactly as the
ingress has it, or the new keys will not authenticate. One operator edits a file at a time (no locking).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

from serve.config.tenancy import TENANT_PATTERN, PlansConfig
from serve.tenancy.keys import (
    PEPPER_ENV,
    KeyEntry,
    KeysFile,
    KeysFileError,
    generate_key,
    hash_key,
    pepper_from_env,
    read_keys_file,
)


class CliError(Exception):
    """A mistake the operator can fix; printed as one line, exit status 1."""


def write_keys_file(path: str | Path, keys: KeysFile) -> None:
    """Replace the file atomically (temp file in the same directory + rename), readable by its owner only."""
    path = Path(path)
    # mkstemp creates the file 0600 from the start: the hashes are never world-readable, not even briefly
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(keys.model_dump_json(indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def _read(path: str, must_exist: bool) -> KeysFile:
    if not must_exist and not Path(path).exists():
        return KeysFile()
    try:
        return read_keys_file(path)
    except KeysFileError as exc:
        raise CliError(str(exc)) from None


def _iso(ts: int | None) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ") if ts is not None else "-"


def cmd_create(args: argparse.Namespace) -> int:
    if not re.match(TENANT_PATTERN, args.tenant):
        raise CliError(f"bad tenant name {args.tenant!r}: 1-64 characters, letters, digits, '.', '_' or '-', "
                       "starting with a letter or digit")
    if not re.match(TENANT_PATTERN, args.plan):
        raise CliError(f"bad plan name {args.plan!r}: same alphabet as tenant names")
    if args.plans:
        try:
            plans = PlansConfig.load(args.plans)
        except (OSError, ValueError, yaml.YAMLError) as exc:
            raise CliError(f"cannot read plans file {args.plans}: {exc}") from None
        if args.plan not in plans.plans:
            raise CliError(f"unknown plan {args.plan!r}; {args.plans} defines {sorted(plans.plans)}")
    keys = _read(args.file, must_exist=False)
    pepper = pepper_from_env()
    scheme = "hmac-sha256:" if pepper else "sha256:"
    if any(e.revoked_at is None and not e.hash.startswith(scheme) for e in keys.keys):
        print(f"warning: other keys in {args.file} were hashed {'without' if pepper else 'with'} "
              f"{PEPPER_ENV}; set it exactly as the ingress does", file=sys.stderr)
    taken = {e.key_id for e in keys.keys}
    key_id, key = generate_key()
    while key_id in taken:  # 48-bit ids: a clash is astronomically rare, but cheap to rule out
        key_id, key = generate_key()
    entry = KeyEntry(key_id=key_id, tenant=args.tenant, plan=args.plan, hash=hash_key(key, pepper),
                     created_at=int(time.time()), label=args.label or "")
    write_keys_file(args.file, KeysFile(keys=[*keys.keys, entry]))
    print(key)
    print(f"created key {key_id} (tenant {args.tenant}, plan {args.plan}) in {args.file}; "
          "the key above is shown only this once", file=sys.stderr)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    keys = _read(args.file, must_exist=True)
    rows = [{"key_id": e.key_id, "tenant": e.tenant, "plan": e.plan, "label": e.label,
             "created": _iso(e.created_at), "revoked": _iso(e.revoked_at)} for e in keys.keys]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    cols = ["key_id", "tenant", "plan", "label", "created", "revoked"]
    widths = {c: max([len(c), *(len(r[c]) for r in rows)]) for c in cols}
    for row in [dict(zip(cols, cols)), *rows]:
        print("  ".join(row[c].ljust(widths[c]) for c in cols).rstrip())
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    keys = _read(args.file, must_exist=True)
    found = next((e for e in keys.keys if e.key_id == args.key_id), None)
    if found is None:
        raise CliError(f"unknown key id {args.key_id!r} in {args.file}; `keys list --file {args.file}` shows them")
    if found.revoked_at is not None:
        print(f"key {found.key_id} was already revoked at {_iso(found.revoked_at)}", file=sys.stderr)
        return 0
    revoked = found.model_copy(update={"revoked_at": int(time.time())})
    write_keys_file(args.file, KeysFile(keys=[revoked if e is found else e for e in keys.keys]))
    print(f"revoked key {found.key_id} (tenant {found.tenant}); running ingresses refuse it within seconds",
          file=sys.stderr)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m serve.tenancy.admin", description=__doc__.split("\n")[0])
    top = parser.add_subparsers(dest="group", required=True)
    keys = top.add_parser("keys", help="API keys").add_subparsers(dest="command", required=True)

    create = keys.add_parser("create", help="issue a key; prints it once on stdout")
    create.add_argument("--file", required=True, help="keys file (created if missing)")
    create.add_argument("--tenant", required=True)
    create.add_argument("--plan", required=True)
    create.add_argument("--label", default="", help="a note for listings, e.g. 'ci'")
    create.add_argument("--plans", help="plans file or AppConfig YAML: refuse plan names it does not define")
    create.set_defaults(func=cmd_create)

    listing = keys.add_parser("list", help="show keys (never hashes)")
    listing.add_argument("--file", required=True)
    listing.add_argument("--json", action="store_true", help="JSON instead of a table")
    listing.set_defaults(func=cmd_list)

    revoke = keys.add_parser("revoke", help="refuse a key from now on")
    revoke.add_argument("--file", required=True)
    revoke.add_argument("key_id")
    revoke.set_defaults(func=cmd_revoke)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
