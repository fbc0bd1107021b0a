"""A redeploy that changes scaling, a run-time setting or the set of models restarts no replica of the models it
does not change (one Serve application per model; settings through the Ingress's user_config).

Each step redeploys the whole Serve config declaratively, as `serve deploy` and KubeRay do, and checks that
the first model's stage replicas (and the ingress's) are the same actors as before, and that the change is in
force. The last step puts the session's config back.
"""

from __future__ import annotations

import time

import pytest
import ray

from tests.integration.test_api_e2e import TERMINAL, api, wait_for

pytestmark = pytest.mark.integration

FIRST, SECOND, ADDED = "cogvideox-tiny-2b", "cogvideox-tiny-5b", "cogvideox-tiny-5b-added"
TERM = "quokka parade"  # a term no default list blocks


def replicas(app: str) -> dict[str, set[str]]:
    """deployment -> actor ids of its live replicas in application `app`."""
    out: dict[str, set[str]] = {}
    for actor in ray.util.list_named_actors(all_namespaces=True):
        name = actor["name"]
        if name.startswith("SERVE_REPLICA::") and name.split("::", 1)[1].startswith(f"{app}#"):
            deployment = name.split("#")[1]
            handle = ray.get_actor(name, namespace=actor["namespace"])
            out.setdefault(deployment, set()).add(handle._actor_id.hex())
    return out


def first_model_and_ingress() -> dict[str, set[str]]:
    return {**{f"model/{d}": ids for d, ids in replicas(f"model-{FIRST}").items()},
            **{f"ingress/{d}": ids for d, ids in replicas("videogen").items()}}


def wait_until_json(http, path: str, predicate, timeout_s: float = 60) -> dict:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        body = http.get(path).json()
        if predicate(body):
            return body
        time.sleep(0.2)
    raise AssertionError(f"{path} never matched: {body}")


def create(http, **body) -> tuple[int, dict]:
    r = http.post("/v1/videos", json={"prompt": "a lighthouse at dusk", "seed": 11, **body})
    return r.status_code, r.json()


def changed(config, **sections):
    """`config` with some of its sections' fields changed: {"safety": {"blocked_terms": ...}, ...}."""
    return config.model_copy(update={name: getattr(config, name).model_copy(update=fields)
                                     for name, fields in sections.items()})


def test_scaling_settings_and_models_change_without_restarting_the_first_model(cluster):
    # every step's file is written by the same code that wrote the session's (deployments/serve_config.py)
    before = first_model_and_ingress()
    assert set(before) == {"model/Model", "model/TextEncoder", "model/Denoiser", "model/VaeDecoder", "ingress/Ingress"}
    assert all(len(ids) == 1 for ids in before.values()), before

    try:
        # 1. scaling: a second TextEncoder replica (for every model: the section applies to each model's stages)
        encoder = cluster.config.deployments.text_encoder.model_copy(update={"num_replicas": 2})
        scaled = changed(cluster.config, deployments={"text_encoder": encoder})
        cluster.deploy(cluster.serve_config(scaled))
        now = first_model_and_ingress()
        assert len(now["model/TextEncoder"]) == 2 and before["model/TextEncoder"] < now["model/TextEncoder"]
        assert {k: v for k, v in now.items() if k != "model/TextEncoder"} == {
            k: v for k, v in before.items() if k != "model/TextEncoder"}
        before = now

        # 2. a run-time setting: a new blocked term, through the Ingress's user_config
        with api(cluster) as http:
            assert create(http, prompt=f"a {TERM} at noon")[0] == 200  # allowed before
        blocked = changed(scaled, safety={"blocked_terms": {**scaled.safety.blocked_terms, "test": [TERM]}})
        cluster.deploy(cluster.serve_config(blocked))
        assert first_model_and_ingress() == before
        with api(cluster) as http:
            status, body = create(http, prompt=f"a {TERM} at noon")
            assert status == 400 and "content policy" in body["error"]["message"], body

        # a change the running ingress cannot apply (a key names a plan the config lacks; only the ingress sees
        # that): it keeps serving the settings it has, says so in /readyz, and the next good change clears it
        from deployments.local import deploy

        deploy(cluster.serve_config(changed(blocked, keys={"legacy_plan": "platinum"})))
        with api(cluster) as http:
            ready = wait_until_json(http, "/readyz", lambda r: "settings" in r["checks"])
            assert "plans missing from `plans`" in ready["checks"]["settings"] and ready["status"] == "not_ready"
            status, body = create(http, prompt=f"a {TERM} at noon")
            assert status == 400 and "content policy" in body["error"]["message"], body  # previous ones in force
        assert first_model_and_ingress() == before
        cluster.deploy(cluster.serve_config(blocked))  # waits for /readyz 200
        assert first_model_and_ingress() == before

        # 3. the set of models: the second model removed, then a model never deployed before added (its
        # application is built while the ingress already has its catalogue entry)
        cluster.deploy(cluster.serve_config(blocked.model_copy(update={"models": []})))
        assert first_model_and_ingress() == before
        with api(cluster) as http:
            status, body = create(http, model=SECOND)
            assert status == 400 and body["error"]["code"] == "model_not_found", body
        added = blocked.models[0].model_copy(update={"name": ADDED, "aliases": []})
        cluster.deploy(cluster.serve_config(blocked.model_copy(update={"models": [added]})))
        assert first_model_and_ingress() == before
        with api(cluster) as http:
            status, body = create(http, model=ADDED)
            assert status == 200, body
            done = wait_for(http, body["id"], lambda v: v["status"] in TERMINAL, timeout_s=180)
            assert done["status"] == "completed" and done["model"] == ADDED, done
            first = create(http)[1]  # and the first model still serves
            assert wait_for(http, first["id"], lambda v: v["status"] in TERMINAL, timeout_s=180)["status"] == \
                "completed"
        assert first_model_and_ingress() == before
    finally:
        cluster.deploy()  # the session's config for the tests that follow
