"""Helpers of the k8s manifest tests: render an overlay with kubectl (kustomize v5), and validate objects against
their schemas.

- core objects (v1, apps/v1, ...): Kubernetes' own OpenAPI schemas, strict (the `kubernetes-validate` package);
- RayService / RayCluster: the KubeRay CRDs copied into schemas/ (SOURCE.txt says from where), version v1's
  openAPIV3Schema read with the API server's structural-schema semantics (`crd_validator`);
- PodMonitor / PrometheusRule: `MONITORING_SCHEMAS`, the parts of the Prometheus Operator's v1 API these
  manifests may use, closed like the CRDs (the operator's CRDs are not vendored here).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
OVERLAYS = ("dev", "prod", "prod-2gpu")
# prod and its variants (prod-2gpu: prod with CogVideoX-5b's Denoiser CFG-parallel on 2 GPUs): H100 nodes, GCS fault
# tolerance, prod's models
PROD_OVERLAYS = ("prod", "prod-2gpu")
KUBERNETES_VERSION = "1.30"  # schema version for kubernetes-validate (any it ships from 1.25 on would do)
CRD_FILES = {"RayService": "ray.io_rayservices.yaml", "RayCluster": "ray.io_rayclusters.yaml"}

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are ~1 MB each: libyaml reads them in 0.3 s


# ---- rendering ------------------------------------------------------------------------------------------------------

MIN_KUSTOMIZE = (5, 0)  # the kustomizations use v5 syntax (`labels`, `patches`); kubectl >= 1.27 embeds v5


def kubectl() -> str | None:
    """The kubectl to render with: $KUBECTL, else the one on PATH."""
    return shutil.which(os.environ.get("KUBECTL", "kubectl"))


@functools.cache
def kustomize_version() -> tuple[int, ...] | None:
    """The kustomize version built into kubectl (`kubectl version --client`), None if it says none."""
    exe = kubectl()
    assert exe, "kubectl not found"
    proc = subprocess.run([exe, "version", "--client", "-o", "json"], capture_output=True, text=True, timeout=60)
    raw = json.loads(proc.stdout or "{}").get("kustomizeVersion", "") if proc.returncode == 0 else ""
    match = re.match(r"v?(\d+)\.(\d+)", raw)
    return tuple(int(n) for n in match.groups()) if match else None


def require_kubectl() -> None:
    """Fail (not skip) without a kubectl whose kustomize renders v5 kustomizations."""
    exe = kubectl()
    if exe is None:
        pytest.fail(f"kubectl not found ({os.environ.get('KUBECTL', 'kubectl')}): run scripts/setup.sh, or install "
                    "kubectl >= 1.27 (kustomize v5)", pytrace=False)
    version = kustomize_version()
    if version is None or version < MIN_KUSTOMIZE:
        found = ".".join(map(str, version)) if version else "none (kubectl < 1.21, e.g. Debian's 1.20)"
        pytest.fail(f"{exe} embeds kustomize {found}; the manifests need kustomize >= "
                    f"{'.'.join(map(str, MIN_KUSTOMIZE))} (kubectl >= 1.27): set $KUBECTL to one", pytrace=False)


@functools.cache
def _kustomize(kustomization_dir: Path) -> tuple[str, str]:
    exe = kubectl()
    assert exe, "kubectl not found"
    proc = subprocess.run([exe, "kustomize", str(kustomization_dir)], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise AssertionError(f"kubectl kustomize {kustomization_dir} failed:\n{proc.stderr}")
    return proc.stdout, proc.stderr


@functools.cache
def render(overlay_dir: Path) -> tuple[dict[str, Any], ...]:
    """`kubectl kustomize <dir>` parsed into objects (raises with kubectl's message if it fails)."""
    return tuple(d for d in yaml.load_all(_kustomize(overlay_dir)[0], Loader=_Loader) if d)


def render_warnings(overlay_dir: Path) -> list[str]:
    """What `kubectl kustomize <dir>` printed on stderr (kustomize's deprecation warnings land there)."""
    return [line for line in _kustomize(overlay_dir)[1].splitlines() if line.strip()]


def rendered_text(overlay_dir: Path) -> str:
    return "---\n".join(yaml.safe_dump(d, sort_keys=True) for d in render(overlay_dir))


# ---- core objects ---------------------------------------------------------------------------------------------------

def is_core(obj: dict[str, Any]) -> bool:
    """Built-in API groups: no dot in the group (v1, apps/v1, batch/v1) or a *.k8s.io group."""
    api = obj.get("apiVersion", "")
    group = api.rpartition("/")[0]
    return not group or "." not in group or group.endswith(".k8s.io")


def validate_core(obj: dict[str, Any]) -> None:
    kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def validate_metadata(obj: dict[str, Any]) -> None:
    """A custom resource's metadata as ObjectMeta (a CRD schema leaves metadata open)."""
    validate_core({"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj["metadata"]})


def validate_pod_template(template: dict[str, Any]) -> None:
    """A pod template embedded in a custom resource, as a core PodTemplateSpec (strict)."""
    validate_core({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template})


# ---- CRDs -----------------------------------------------------------------------------------------------------------

def _unique_keys(validator: Any, keys: dict[str, Any], instance: Any, schema: dict[str, Any]) -> Iterator[Any]:
    """x-kubernetes-list-type: map: no two items with the same values of the map keys (absent = the default)."""
    if not isinstance(instance, list):
        return
    seen: set[tuple[Any, ...]] = set()
    for item in instance:
        if isinstance(item, dict):
            key = tuple(repr(item.get(k, default)) for k, default in keys.items())
            if key in seen:
                yield jsonschema.ValidationError(f"duplicate entry for list-map keys {list(keys)}: {key}")
            seen.add(key)


_K8sValidator = jsonschema.validators.extend(jsonschema.Draft7Validator, {"x-unique-keys": _unique_keys})
_DROPPED = {"description", "default", "format", "nullable", "example", "externalDocs"}


def structural_to_jsonschema(node: dict[str, Any]) -> dict[str, Any]:
    """An OpenAPI v3 structural schema (apiextensions.k8s.io/v1) as JSON Schema that means what the API server does.

    - An object with `properties` and neither `additionalProperties` nor `x-kubernetes-preserve-unknown-fields`
      is closed: the server drops or (kubectl's default strict field validation) rejects unknown fields, so a
      misspelt field must fail here too. `x-kubernetes-embedded-resource` adds apiVersion/kind/metadata.
    - `x-kubernetes-int-or-string` without a type: integer or string. `nullable`: null allowed.
    - `x-kubernetes-list-type`: `set` = unique items, `map` = unique by `x-kubernetes-list-map-keys`.
    - `x-kubernetes-validations` (CEL) are not evaluated; `format` (int32, ...) is not asserted.
    """
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: structural_to_jsonschema(s) for name, s in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = structural_to_jsonschema(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [structural_to_jsonschema(s) for s in value]
        elif key.startswith("x-kubernetes-") or key in _DROPPED:
            continue
        else:
            out[key] = value
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if node.get("x-kubernetes-int-or-string") and "type" not in out and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    if node.get("x-kubernetes-list-type") == "map" and node.get("x-kubernetes-list-map-keys"):
        item_props = node.get("items", {}).get("properties", {})
        out["x-unique-keys"] = {k: item_props.get(k, {}).get("default") for k in node["x-kubernetes-list-map-keys"]}
    if "properties" in node and "additionalProperties" not in node \
            and not node.get("x-kubernetes-preserve-unknown-fields"):
        if node.get("x-kubernetes-embedded-resource"):
            for name in ("apiVersion", "kind"):
                out["properties"].setdefault(name, {"type": "string"})
            out["properties"].setdefault("metadata", {"type": "object"})
        out["additionalProperties"] = False
    return out


def crd_version_schema(crd: dict[str, Any], version: str) -> dict[str, Any]:
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            assert v.get("served"), f"{crd['metadata']['name']} does not serve {version}"
            return v["schema"]["openAPIV3Schema"]
    raise KeyError(f"{crd['metadata']['name']} has no version {version}")


@functools.cache
def crd(kind: str) -> dict[str, Any]:
    return yaml.load((SCHEMAS / CRD_FILES[kind]).read_text(), Loader=_Loader)


@functools.cache
def crd_validator(kind: str, version: str = "v1") -> Any:
    schema = structural_to_jsonschema(crd_version_schema(crd(kind), version))
    _K8sValidator.check_schema(schema)
    return _K8sValidator(schema)


def crd_errors(obj: dict[str, Any]) -> list[str]:
    """Every schema violation of a RayService / RayCluster, as `path: message`."""
    group, _, version = obj["apiVersion"].rpartition("/")
    assert group == "ray.io", obj["apiVersion"]
    validator = crd_validator(obj["kind"], version)
    return [f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
            for e in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))]


# ---- Prometheus Operator objects -------------------------------------------------------------------------------------

_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_METADATA = {"type": "object", "required": ["name"]}
_RELABEL = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "sourceLabels": {"type": "array", "items": {"type": "string", "pattern": "^[a-zA-Z_][a-zA-Z0-9_]*$"}},
        "separator": {"type": "string"}, "targetLabel": {"type": "string"}, "regex": {"type": "string"},
        "modulus": {"type": "integer"}, "replacement": {"type": "string"},
        "action": {"enum": ["replace", "Replace", "keep", "Keep", "drop", "Drop", "hashmod", "HashMod",
                            "labelmap", "LabelMap", "labeldrop", "LabelDrop", "labelkeep", "LabelKeep",
                            "lowercase", "Lowercase", "uppercase", "Uppercase", "keepequal", "KeepEqual",
                            "dropequal", "DropEqual"]},
    },
}
_SELECTOR = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "matchLabels": _LABELS,
        "matchExpressions": {"type": "array", "items": {
            "type": "object", "additionalProperties": False, "required": ["key", "operator"],
            "properties": {"key": {"type": "string"}, "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                           "values": {"type": "array", "items": {"type": "string"}}}}},
    },
}
_DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?"
                                          r"(([0-9]+)s)?(([0-9]+)ms)?)$"}
MONITORING_SCHEMAS: dict[str, dict[str, Any]] = {
    "PodMonitor": {
        "type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "PodMonitor"},
            "metadata": _METADATA,
            "spec": {
                "type": "object", "additionalProperties": False, "required": ["selector"],
                "properties": {
                    "jobLabel": {"type": "string"},
                    "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                    "selector": _SELECTOR,
                    "namespaceSelector": {"type": "object", "additionalProperties": False, "properties": {
                        "any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}}},
                    "sampleLimit": {"type": "integer", "minimum": 0},
                    "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": {
                        "type": "object", "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"}, "path": {"type": "string"},
                            "scheme": {"enum": ["http", "https"]}, "interval": _DURATION,
                            "scrapeTimeout": _DURATION, "honorLabels": {"type": "boolean"},
                            "relabelings": {"type": "array", "items": _RELABEL},
                            "metricRelabelings": {"type": "array", "items": _RELABEL},
                        }}},
                },
            },
        },
    },
    "PrometheusRule": {
        "type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "PrometheusRule"},
            "metadata": _METADATA,
            "spec": {
                "type": "object", "additionalProperties": False,
                "properties": {"groups": {"type": "array", "items": {
                    "type": "object", "additionalProperties": False, "required": ["name"],
                    "properties": {
                        "name": {"type": "string", "minLength": 1}, "interval": _DURATION,
                        "query_offset": _DURATION, "limit": {"type": "integer"}, "labels": _LABELS,
                        "partial_response_strategy": {"type": "string"},
                        "rules": {"type": "array", "items": {
                            "type": "object", "additionalProperties": False, "required": ["expr"],
                            "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                            "properties": {
                                "alert": {"type": "string"}, "record": {"type": "string"},
                                "expr": {"type": ["string", "integer"]}, "for": _DURATION,
                                "keep_firing_for": _DURATION, "labels": _LABELS, "annotations": _LABELS,
                            }}},
                    }}}},
            },
        },
    },
}


def monitoring_errors(obj: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(MONITORING_SCHEMAS[obj["kind"]])
    return [f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in validator.iter_errors(obj)]
