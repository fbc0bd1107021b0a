"""Tenancy: the operator CLI, key authentication (constant-time path, revocation, hot reload) and plans."""

from __future__ import annotations

import hmac
import json
import logging
import os
import re
import stat

import pytest
import yaml
from pydantic import ValidationError

from serve.config.tenancy import KeysConfig, Plan, PlansConfig
from serve.errors import ServiceError
from serve.tenancy.admin import main
from serve.tenancy.keys import (
    PEPPER_ENV,
    KeyRing,
    KeysFileError,
    Principal,
    keyring_from_config,
    read_keys_file,
)
from serve.tenancy.plans import check_cost, cost_of, resolve_plan
from tests.params import example_params

KEY_RE = re.compile(r"^vg_([0-9a-f]{12})_[A-Za-z0-9_-]{32,}$")


@pytest.fixture(autouse=True)
def _no_pepper(monkeypatch):
    monkeypatch.delenv(PEPPER_ENV, raising=False)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CountingCompare:
    """hmac.compare_digest, counting calls and remembering the lengths compared."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def __call__(self, a: bytes, b: bytes) -> bool:
        self.calls.append((len(a), len(b)))
        return hmac.compare_digest(a, b)


def create(capsys, path, tenant="acme", plan="pro", *extra: str) -> str:
    assert main(["keys", "create", "--file", str(path), "--tenant", tenant, "--plan", plan, *extra]) == 0
    out = capsys.readouterr().out
    return out.strip()


@pytest.fixture
def keys_path(tmp_path):
    return tmp_path / "keys.json"


# -- CLI -----------------------------------------------------------------------------------------
def test_create_prints_only_the_key_and_stores_only_its_hash(capsys, keys_path):
    assert main(["keys", "create", "--file", str(keys_path), "--tenant", "acme", "--plan", "pro",
                 "--label", "ci"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert len(lines) == 1 and KEY_RE.match(lines[0])
    key = lines[0]
    key_id = KEY_RE.match(key).group(1)
    assert key_id in captured.err and key not in captured.err
    text = keys_path.read_text()
    assert key not in text and key.split("_", 2)[2] not in text
    (entry,) = read_keys_file(keys_path).keys
    assert (entry.key_id, entry.tenant, entry.plan, entry.label, entry.revoked_at) == (key_id, "acme", "pro", "ci",
                                                                                        None)
    assert entry.hash.startswith("sha256:")


def test_keys_file_is_owner_only_and_no_temp_files_are_left(capsys, keys_path):
    create(capsys, keys_path)
    create(capsys, keys_path, "globex", "dev")
    assert stat.S_IMODE(os.stat(keys_path).st_mode) == 0o600
    assert sorted(p.name for p in keys_path.parent.iterdir()) == ["keys.json"]
    assert len(read_keys_file(keys_path).keys) == 2


def test_list_shows_keys_without_hashes(capsys, keys_path):
    key = create(capsys, keys_path, "acme", "pro", "--label", "ci")
    key_id = KEY_RE.match(key).group(1)
    assert main(["keys", "list", "--file", str(keys_path)]) == 0
    out = capsys.readouterr().out
    header, row = out.splitlines()
    assert header.split() == ["key_id", "tenant", "plan", "label", "created", "revoked"]
    assert row.split()[:4] == [key_id, "acme", "pro", "ci"] and row.split()[-1] == "-"
    assert "sha256" not in out and key not in out

    assert main(["keys", "list", "--file", str(keys_path), "--json"]) == 0
    (item,) = json.loads(capsys.readouterr().out)
    assert item["key_id"] == key_id and "hash" not in item


def test_revoke_marks_the_key_and_reports_unknown_ids(capsys, keys_path):
    key = create(capsys, keys_path)
    key_id = KEY_RE.match(key).group(1)
    assert main(["keys", "revoke", "--file", str(keys_path), "0123456789ab"]) == 1
    assert "unknown key id '0123456789ab'" in capsys.readouterr().err
    assert main(["keys", "revoke", "--file", str(keys_path), key_id]) == 0
    (entry,) = read_keys_file(keys_path).keys
    assert entry.revoked_at is not None
    assert main(["keys", "revoke", "--file", str(keys_path), key_id]) == 0
    assert "already revoked" in capsys.readouterr().err


@pytest.mark.parametrize("tenant", ["a/b", "-acme", "", "x" * 65, "acme corp"])
def test_create_refuses_bad_tenant_names(capsys, keys_path, tenant):
    assert main(["keys", "create", "--file", str(keys_path), f"--tenant={tenant}", "--plan", "pro"]) == 1
    assert "bad tenant name" in capsys.readouterr().err
    assert not keys_path.exists()


def test_create_checks_the_plan_against_a_plans_file(capsys, keys_path, tmp_path):
    plans = tmp_path / "plans.yaml"
    plans.write_text(yaml.safe_dump({"plans": {"gold": {"max_cost": 10}}}))
    assert main(["keys", "create", "--file", str(keys_path), "--tenant", "acme", "--plan", "pro",
                 "--plans", str(plans)]) == 1
    assert "unknown plan 'pro'" in capsys.readouterr().err and not keys_path.exists()
    assert KEY_RE.match(create(capsys, keys_path, "acme", "gold", "--plans", str(plans)))


def test_cli_reports_a_malformed_keys_file(capsys, keys_path):
    keys_path.write_text("{not json")
    assert main(["keys", "list", "--file", str(keys_path)]) == 1
    assert "is not JSON" in capsys.readouterr().err


# -- authentication ------------------------------------------------------------------------------
def test_authenticate_right_wrong_unknown_and_malformed(capsys, keys_path):
    key = create(capsys, keys_path, "acme", "pro")
    key_id = KEY_RE.match(key).group(1)
    ring = KeyRing.load(keys_path)
    assert ring.authenticate(key) == Principal("acme", "pro", key_id)
    wrong_secret = key[:-1] + ("A" if key[-1] != "A" else "B")
    assert ring.authenticate(wrong_secret) is None
    assert ring.authenticate(f"vg_{'0' * 12}_{key.split('_', 2)[2]}") is None  # unknown id, real secret
    for bad in ("", "Bearer " + key, key + " ", "vg_xyz", "x" * 10_000):
        assert ring.authenticate(bad) is None


def test_revoked_key_is_refused(capsys, keys_path):
    key = create(capsys, keys_path)
    main(["keys", "revoke", "--file", str(keys_path), KEY_RE.match(key).group(1)])
    assert KeyRing.load(keys_path).authenticate(key) is None


def test_unknown_id_costs_the_same_one_comparison_as_a_known_one(capsys, keys_path):
    key = create(capsys, keys_path)
    spy = CountingCompare()
    ring = KeyRing.load(keys_path, compare=spy)
    assert ring.authenticate(key) is not None
    known = list(spy.calls)
    spy.calls.clear()
    assert ring.authenticate(f"vg_{'f' * 12}_{'s' * 43}") is None
    assert spy.calls == known and len(known) == 1 and known[0][0] == known[0][1]


def test_plain_keys_are_all_compared_and_not_kept_in_clear():
    spy = CountingCompare()
    ring = KeyRing.from_plain({"sk-local-dev": ("default", "dev"), "sk-other": ("team-b", "pro")}, compare=spy)
    assert ring.authenticate("sk-local-dev") == Principal("default", "dev", "legacy-0")
    assert len(spy.calls) == 2  # no early exit on the first match
    assert ring.authenticate("sk-other").tenant == "team-b"
    assert ring.authenticate("sk-local-de") is None
    assert "sk-local-dev" not in repr(vars(ring))

    spy_empty = CountingCompare()
    assert KeyRing.from_plain({}, compare=spy_empty).authenticate("anything") is None
    assert len(spy_empty.calls) == 1  # the dummy compare


def test_from_plain_rejects_bad_entries():
    with pytest.raises(ValueError, match="tenant"):
        KeyRing.from_plain({"sk-x": ("a/b", "dev")})
    with pytest.raises(ValueError, match="vg_"):
        KeyRing.from_plain({f"vg_{'a' * 12}_{'b' * 40}": ("acme", "dev")})


def test_revocation_applies_without_restart_checked_at_most_once_a_second(capsys, keys_path):
    key = create(capsys, keys_path)
    clock = Clock()
    ring = KeyRing.load(keys_path, clock=clock)
    assert ring.authenticate(key) is not None
    main(["keys", "revoke", "--file", str(keys_path), KEY_RE.match(key).group(1)])
    clock.now += 0.5
    assert ring.authenticate(key) is not None  # not re-checked yet
    clock.now += 0.5
    assert ring.authenticate(key) is None


def test_reload_on_mtime_change_of_a_file_edited_in_place(capsys, keys_path):
    key = create(capsys, keys_path)
    clock = Clock()
    ring = KeyRing.load(keys_path, clock=clock)
    inode = os.stat(keys_path).st_ino
    text = keys_path.read_text()
    assert '"revoked_at": null' in text
    size = len(text)
    keys_path.write_text(text.replace('"revoked_at": null', '"revoked_at": 1000'))
    st = os.stat(keys_path)  # same inode, same size: only the mtime tells
    assert st.st_size == size
    os.utime(keys_path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert os.stat(keys_path).st_ino == inode
    clock.now += 1
    assert ring.authenticate(key) is None


def test_a_broken_file_keeps_the_loaded_keys_and_logs_no_hash(capsys, keys_path, caplog):
    key = create(capsys, keys_path)
    digest = read_keys_file(keys_path).keys[0].hash
    clock = Clock()
    ring = KeyRing.load(keys_path, clock=clock)
    data = json.loads(keys_path.read_text())
    data["keys"][0]["revoked"] = True  # a typo: must not be silently ignored
    keys_path.write_text(json.dumps(data))
    clock.now += 1
    with caplog.at_level(logging.DEBUG):
        assert ring.authenticate(key) is not None
    assert "revoked" in caplog.text and "keeping the 1 keys" in caplog.text
    assert digest.split(":")[1] not in caplog.text
    with pytest.raises(KeysFileError) as err:
        read_keys_file(keys_path)
    assert digest.split(":")[1] not in str(err.value)


def test_keys_file_errors_never_quote_a_hash(capsys, keys_path):
    create(capsys, keys_path)
    data = json.loads(keys_path.read_text())
    digest = data["keys"][0]["hash"]
    data["keys"][0]["hash"] = digest + "0"  # fails the pattern; pydantic would quote the value
    keys_path.write_text(json.dumps(data))
    with pytest.raises(KeysFileError, match=r"keys\.0\.hash") as err:
        read_keys_file(keys_path)
    assert digest.split(":")[1] not in str(err.value)


def test_no_secret_or_hash_in_reprs_or_logs(capsys, keys_path, caplog):
    with caplog.at_level(logging.DEBUG):
        key = create(capsys, keys_path, "acme", "pro")
        entry = read_keys_file(keys_path).keys[0]
        clock = Clock()
        ring = KeyRing.load(keys_path, clock=clock, pepper=b"different")  # also logs the scheme mismatch
        principal = KeyRing.load(keys_path).authenticate(key)
        ring.authenticate(key)
        ring.authenticate(key[:-2] + "zz")
        main(["keys", "revoke", "--file", str(keys_path), entry.key_id])
        clock.now += 5
        ring.authenticate(key)
    secret = key.split("_", 2)[2]
    digest = entry.hash.split(":")[1]
    assert principal is not None
    texts = [repr(principal), repr(ring), repr(entry), str(entry), caplog.text, capsys.readouterr().err]
    for text in texts:
        assert secret not in text and digest not in text
    assert "cannot authenticate" in caplog.text  # the pepper mismatch was logged, by key_id only


def test_pepper_must_match_between_cli_and_server(capsys, keys_path, monkeypatch):
    monkeypatch.setenv(PEPPER_ENV, "pepper-1")
    key = create(capsys, keys_path)
    assert read_keys_file(keys_path).keys[0].hash.startswith("hmac-sha256:")
    assert KeyRing.load(keys_path).authenticate(key) is not None
    assert KeyRing.load(keys_path, pepper=b"pepper-2").authenticate(key) is None
    assert KeyRing.load(keys_path, pepper=None).authenticate(key) is None


def test_keyring_from_config_never_mixes_in_dev_keys_unless_asked(capsys, keys_path):
    key = create(capsys, keys_path)
    assert keyring_from_config(KeysConfig(), ["sk-local-dev"]).authenticate("sk-local-dev") == Principal(
        "default", "dev", "legacy-0")
    prod = keyring_from_config(KeysConfig(keys_file=str(keys_path)), ["sk-local-dev"])
    assert prod.authenticate("sk-local-dev") is None and prod.authenticate(key) is not None
    mixed = keyring_from_config(KeysConfig(keys_file=str(keys_path), allow_legacy_keys=True), ["sk-local-dev"])
    assert mixed.authenticate("sk-local-dev") is not None and mixed.plans_in_use() == {"pro", "dev"}


# -- plans ---------------------------------------------------------------------------------------
PARAMS = example_params(num_frames=49, width=720, height=480, num_inference_steps=50)


def test_default_plans_grow_from_dev_to_enterprise():
    plans = PlansConfig().plans
    assert list(plans) == ["dev", "standard", "pro", "enterprise"]
    for field in Plan.model_fields:
        values = [getattr(plans[n], field) for n in plans]
        assert values == sorted(values), field
    assert plans["dev"].max_cost < cost_of(PARAMS) <= plans["standard"].max_cost


def test_cost_and_ceiling():
    assert cost_of(PARAMS) == 49 * 720 * 480 * 50
    check_cost(Plan(max_cost=cost_of(PARAMS), max_steps=50), PARAMS)  # at the ceiling is allowed
    with pytest.raises(ServiceError) as err:
        check_cost(Plan(max_cost=cost_of(PARAMS) - 1, max_steps=50), PARAMS, plan_name="dev")
    e = err.value
    assert (e.status, e.code, e.param) == (400, "cost_ceiling_exceeded", "num_inference_steps")
    assert f"{cost_of(PARAMS):,}" in e.message and f"{cost_of(PARAMS) - 1:,}" in e.message
    assert "plan 'dev'" in e.message and "num_inference_steps to 49 or less" in e.message


def test_cost_ceiling_below_one_step_points_at_size():
    with pytest.raises(ServiceError) as err:
        check_cost(Plan(max_cost=1000, max_steps=50), PARAMS)
    assert err.value.param == "size" and "even one step" in err.value.message


def test_max_steps():
    with pytest.raises(ServiceError) as err:
        check_cost(Plan(max_cost=10**12, max_steps=20), PARAMS)
    assert (err.value.code, err.value.param) == ("max_steps_exceeded", "num_inference_steps")


def test_plans_config_lookup_and_files(tmp_path):
    cfg = PlansConfig()
    assert cfg.get("pro") is cfg.plans["pro"]
    with pytest.raises(KeyError, match="unknown plan 'gold'"):
        cfg.get("gold")
    with pytest.raises(ServiceError) as err:
        resolve_plan(cfg, "gold")
    assert (err.value.status, err.value.code) == (403, "plan_not_found")
    with pytest.raises(ValidationError):
        PlansConfig(plans={"a/b": Plan()})

    serve_config = tmp_path / "serve.yaml"
    serve_config.write_text(yaml.safe_dump(
        {"applications": [{"args": {"plans": {"plans": {"gold": {"max_steps": 7}}}}}]}))
    assert PlansConfig.load(serve_config).get("gold").max_steps == 7
    plain = tmp_path / "plans.json"
    plain.write_text(json.dumps({"plans": {"silver": {}}}))
    assert list(PlansConfig.load(plain).plans) == ["silver"]
