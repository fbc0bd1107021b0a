"""NetworkPolicy (networking.k8s.io/v1) semantics for the manifest tests: does a set of rendered policies let one
connection through? As the API documents it, not as any CNI implements it:

- a pod is isolated for a direction when a policy in its namespace selects it and names that direction in
  `policyTypes` (absent: Ingress, plus Egress if the policy has `egress`); an isolated pod takes only what some
  rule of those policies allows, the union of them;
- a connection needs both ends: the source's egress and the destination's ingress;
- a peer with `podSelector` alone means pods of the policy's namespace; with `namespaceSelector` too, both must
  match; `ipBlock` matches addresses outside the cluster (`External`) only; which CNI also applies it to pod IPs is
  left out, as the API leaves it;
- ports: absent = all; `protocol` defaults to TCP; `endPort` makes a range; named ports are refused (the policies
  here use numbers).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Direction = Literal["Ingress", "Egress"]


@dataclass(frozen=True)
class Pod:
    namespace: str
    labels: Mapping[str, str]
    namespace_labels: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # the API server puts this label on every namespace (Kubernetes >= 1.21)
        labels = {"kubernetes.io/metadata.name": self.namespace, **self.namespace_labels}
        object.__setattr__(self, "namespace_labels", labels)


@dataclass(frozen=True)
class External:
    ip: str


Peer = Pod | External


def selects(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """A LabelSelector: matchLabels and matchExpressions all hold; an empty selector selects everything."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok = {"In": key in labels and labels[key] in values,
              "NotIn": key not in labels or labels[key] not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def policy_types(policy: Mapping[str, Any]) -> list[str]:
    spec = policy["spec"]
    return spec.get("policyTypes") or ["Ingress", *(["Egress"] if "egress" in spec else [])]


def isolating(policies: Iterable[Mapping[str, Any]], pod: Pod, direction: Direction) -> list[Mapping[str, Any]]:
    """The policies that select `pod` for `direction`; none means the pod is not isolated that way."""
    return [p for p in policies if p["metadata"].get("namespace") == pod.namespace
            and selects(p["spec"].get("podSelector"), pod.labels) and direction in policy_types(p)]


def _peer_matches(entry: Mapping[str, Any], peer: Peer, policy_namespace: str) -> bool:
    if "ipBlock" in entry:
        if not isinstance(peer, External):
            return False
        ip = ipaddress.ip_address(peer.ip)
        block = entry["ipBlock"]
        return ip in ipaddress.ip_network(block["cidr"]) and \
            not any(ip in ipaddress.ip_network(e) for e in block.get("except") or [])
    if not isinstance(peer, Pod):
        return False
    if "namespaceSelector" in entry:
        namespace_ok = selects(entry["namespaceSelector"], peer.namespace_labels)
    else:
        namespace_ok = peer.namespace == policy_namespace
    return namespace_ok and selects(entry.get("podSelector"), peer.labels)


def _port_matches(ports: list[Mapping[str, Any]] | None, port: int, protocol: str) -> bool:
    if not ports:
        return True
    for entry in ports:
        if entry.get("protocol", "TCP") != protocol:
            continue
        if "port" not in entry:
            return True
        if not isinstance(entry["port"], int):
            raise ValueError(f"named port {entry['port']!r}: the tests only model numeric ports")
        if entry["port"] <= port <= entry.get("endPort", entry["port"]):
            return True
    return False


def _admits(policies: Iterable[Mapping[str, Any]], pod: Pod, direction: Direction, peer: Peer, port: int,
            protocol: str) -> bool:
    """Whether `pod`'s policies let `peer` in (Ingress) or let `pod` out to `peer` (Egress) on port/protocol."""
    selected = isolating(policies, pod, direction)
    if not selected:
        return True
    key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    for policy in selected:
        for rule in policy["spec"].get(key) or []:
            peers = rule.get(peers_key)
            if (not peers or any(_peer_matches(e, peer, policy["metadata"]["namespace"]) for e in peers)) \
                    and _port_matches(rule.get("ports"), port, protocol):
                return True
    return False


def allows(policies: Iterable[Mapping[str, Any]], src: Peer, dst: Peer, port: int, protocol: str = "TCP") -> bool:
    """Whether a connection from `src` to `dst` on port/protocol passes both ends' policies."""
    policies = list(policies)
    egress_ok = not isinstance(src, Pod) or _admits(policies, src, "Egress", dst, port, protocol)
    ingress_ok = not isinstance(dst, Pod) or _admits(policies, dst, "Ingress", src, port, protocol)
    return egress_ok and ingress_ok
