"""Disruption budgets and network policies of the Ray worker pods and the front proxy, in every rendered overlay.

Each GPU worker group has one budget that counts exactly its pods, and so has the front proxy. The worker pods are
isolated both ways and reach only what they need (DNS, Ray inside the service on the ports the RayService fixes,
S3/STS at the overlay's addresses, webhooks from the ingress group alone); only Ray, the front proxy (Serve HTTP)
and Prometheus reach them. API clients reach the front proxy only, which reaches only DNS and Serve HTTP. Pods carry the
labels KubeRay gives them; tests/k8s/netpol.py judges each connection by the API's rules. Whether a CNI enforces
them is beyond a test without a cluster.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any
from urllib.parse import urlsplit

import pytest

from serve.config import AppConfig
from tests.k8s.kube import K8S, PROD_OVERLAYS, render, require_kubectl
from tests.k8s.netpol import External, Pod, allows, isolating, policy_types, selects

GPU = "nvidia.com/gpu"
AWS_POLICY = "videogen-workers-aws"
PLACEHOLDER = ipaddress.ip_network("192.0.2.0/24")  # TEST-NET-1: the base's fail-closed S3/STS address
# the rayStartParams that fix Ray's ports on every node; Ray picks random ports for several of them otherwise
RAY_PORT_PARAMS = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
                   "dashboard-agent-grpc-port", "runtime-env-agent-port", "min-worker-port", "max-worker-port")
HEAD_ONLY_PORTS = {"dashboard": 8265, "client": 10001}  # people's and the operator's; no worker connects to them
KUBERAY_CLUSTER = "videogen-raycluster-7xk2p"  # the RayService's generated cluster name: no selector may use it
PROTECTED_LABELS = ("ray.io/node-type", "ray.io/group", "ray.io/cluster")  # a pod template cannot override these
DNS = Pod("kube-system", {"k8s-app": "kube-dns", "eks.amazonaws.com/component": "coredns"})
CLIENT = External("81.2.69.160")
PUBLIC = (External("93.184.215.14"), External("2606:4700:4700::1111"))
NOT_PUBLIC = ("10.0.0.1", "172.16.0.1", "192.168.0.1", "100.64.0.1", "127.0.0.1", "169.254.169.254",
              "169.254.170.23", "192.0.0.192", "fd00:ec2::254", "fe80::1", "::1", "::ffff:10.0.0.1",
              "64:ff9b::a00:1", "64:ff9b::a9fe:a9fe")


# ---- the pods as KubeRay labels them -------------------------------------------------------------------------------

def _kuberay_labels(template_labels: dict[str, str], node_type: str, group: str) -> dict[str, str]:
    """KubeRay's pod labels (ray-operator common/pod.go labelPod): its own, then the template's but the protected."""
    labels = {"ray.io/is-ray-node": "yes", "ray.io/cluster": KUBERAY_CLUSTER, "ray.io/node-type": node_type,
              "ray.io/group": group, "ray.io/identifier": f"{KUBERAY_CLUSTER}-{node_type}",
              "app.kubernetes.io/name": "kuberay", "app.kubernetes.io/created-by": "kuberay-operator"}
    labels |= {k: v for k, v in template_labels.items() if k not in PROTECTED_LABELS}
    return labels


def _cluster(rs: dict[str, Any]) -> dict[str, Any]:
    return rs["spec"]["rayClusterConfig"]


def _groups(rs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {g["groupName"]: g for g in _cluster(rs)["workerGroupSpecs"]}


def _of_kind(objects: tuple[dict[str, Any], ...], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def _named(objects: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in _of_kind(objects, kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}"
    return found[0]


@pytest.fixture(scope="module")
def pods(objects: tuple[dict[str, Any], ...], rayservice: dict[str, Any]) -> dict[str, Pod]:
    """One pod per kind: `head`, every worker group by name, and `redis-cleanup` (KubeRay's Redis cleanup Job,
    built from the head's template)."""
    (namespace,) = [o["metadata"]["name"] for o in _of_kind(objects, "Namespace")]
    head = _cluster(rayservice)["headGroupSpec"]["template"]["metadata"]["labels"]
    out = {"head": Pod(namespace, _kuberay_labels(head, "head", "headgroup")),
           "redis-cleanup": Pod(namespace, _kuberay_labels(head, "redis-cleanup", "headgroup"))}
    for name, group in _groups(rayservice).items():
        out[name] = Pod(namespace, _kuberay_labels(group["template"]["metadata"]["labels"], "worker", name))
    return out


@pytest.fixture(scope="module")
def proxy_deployment(objects: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    return _named(objects, "Deployment", "videogen-proxy")


@pytest.fixture(scope="module")
def proxy(proxy_deployment: dict[str, Any]) -> Pod:
    """A front proxy pod (proxy.yaml), with its Deployment template's labels."""
    meta = proxy_deployment["metadata"]
    return Pod(meta["namespace"], proxy_deployment["spec"]["template"]["metadata"]["labels"])


@pytest.fixture(scope="module")
def proxy_port(proxy_deployment: dict[str, Any]) -> int:
    """The port nginx serves the API on: the container port the proxy's Service targets (named `http`)."""
    (container,) = proxy_deployment["spec"]["template"]["spec"]["containers"]
    return next(p["containerPort"] for p in container["ports"] if p["name"] == "http")


@pytest.fixture(scope="module")
def workers(rayservice: dict[str, Any]) -> list[str]:
    return list(_groups(rayservice))


@pytest.fixture(scope="module")
def gpu_groups(rayservice: dict[str, Any]) -> list[str]:
    return [name for name, g in _groups(rayservice).items()
            if float(g["template"]["spec"]["containers"][0]["resources"]["limits"].get(GPU, 0)) >= 1]


@pytest.fixture(scope="module")
def ingress_group(rayservice: dict[str, Any], app_config: AppConfig) -> str:
    """The group that advertises the custom resources the Ingress deployment asks for."""
    wanted = app_config.deployments.ingress.ray_actor_options.resources or {}
    hosts = []
    for name, group in _groups(rayservice).items():
        raw = group["rayStartParams"].get("resources", '"{}"')
        advertised = json.loads(raw.strip().strip('"').replace('\\"', '"'))
        if wanted and all(advertised.get(k, 0) >= v for k, v in wanted.items()):
            hosts.append(name)
    assert len(hosts) == 1, f"the Ingress deployment ({wanted}) fits groups {hosts}"
    return hosts[0]


@pytest.fixture(scope="module")
def policies(objects: tuple[dict[str, Any], ...]) -> list[dict[str, Any]]:
    return _of_kind(objects, "NetworkPolicy")


@pytest.fixture(scope="module")
def ray_ports(rayservice: dict[str, Any]) -> dict[str, int]:
    """The head's fixed Ray ports by rayStartParams name, plus `port` (GCS); the same on every node (tested)."""
    params = _cluster(rayservice)["headGroupSpec"]["rayStartParams"]
    return {**{k: int(params[k]) for k in RAY_PORT_PARAMS if k in params}, "port": int(params.get("port", 6379))}


def _node_ports(ray_ports: dict[str, int]) -> list[int]:
    """What every Ray node listens on for other nodes: each fixed port, and the worker range's ends and middle."""
    lo, hi = ray_ports["min-worker-port"], ray_ports["max-worker-port"]
    singles = [v for k, v in ray_ports.items() if k not in ("min-worker-port", "max-worker-port", "port")]
    return [*singles, lo, (lo + hi) // 2, hi]


# ---- disruption budgets ----------------------------------------------------------------------------------------------

def _ray_budgets(objects: tuple[dict[str, Any], ...], proxy: Pod) -> list[dict[str, Any]]:
    """The budgets of Ray pods: all but the front proxy's (tested on its own)."""
    return [pdb for pdb in _of_kind(objects, "PodDisruptionBudget") if not selects(pdb["spec"]["selector"], proxy.labels)]


def test_each_gpu_group_has_one_budget_that_counts_exactly_its_pods(objects: tuple[dict[str, Any], ...],
                                                                   pods: dict[str, Pod], gpu_groups: list[str],
                                                                   proxy: Pod) -> None:
    assert gpu_groups, "no GPU worker group"
    budgets: dict[str, list[str]] = {name: [] for name in gpu_groups}
    for pdb in _ray_budgets(objects, proxy):
        selector = pdb["spec"]["selector"]
        name = pdb["metadata"]["name"]
        assert "ray.io/cluster" not in json.dumps(selector), \
            f"{name}: ray.io/cluster changes with every RayService cluster upgrade"
        counted = [kind for kind, pod in pods.items() if selects(selector, pod.labels)]
        assert len(counted) == 1 and counted[0] in gpu_groups, f"{name} counts the pods of {counted}"
        budgets[counted[0]].append(name)
    assert all(len(names) == 1 for names in budgets.values()), f"budgets per GPU group: {budgets}"


def test_budgets_use_an_integer_min_available_within_the_group(objects: tuple[dict[str, Any], ...],
                                                               rayservice: dict[str, Any],
                                                               pods: dict[str, Pod], proxy: Pod) -> None:
    for pdb in _ray_budgets(objects, proxy):
        spec, name = pdb["spec"], pdb["metadata"]["name"]
        # maxUnavailable and percentages need the controller's scale subresource, which a RayCluster lacks: such
        # a budget allows 0 disruptions forever and every drain of a GPU node hangs
        assert "maxUnavailable" not in spec, f"{name}: RayCluster has no scale subresource; use minAvailable"
        assert isinstance(spec.get("minAvailable"), int), f"{name}: minAvailable must be an integer"
        (group,) = [g for g in _groups(rayservice) if selects(spec["selector"], pods[g].labels)]
        floor = _groups(rayservice)[group]["minReplicas"]
        assert 1 <= spec["minAvailable"] <= floor, \
            f"{name}: minAvailable {spec['minAvailable']} outside 1..minReplicas {floor} of {group}"
        assert spec.get("unhealthyPodEvictionPolicy") == "AlwaysAllow", \
            f"{name}: a pod that is not Ready (loading, broken) must never block a drain"


def test_the_front_proxy_has_one_budget_that_lets_a_drain_through(objects: tuple[dict[str, Any], ...],
                                                                   pods: dict[str, Pod], proxy: Pod,
                                                                   proxy_deployment: dict[str, Any]) -> None:
    budgets = [pdb for pdb in _of_kind(objects, "PodDisruptionBudget") if selects(pdb["spec"]["selector"], proxy.labels)]
    assert len(budgets) == 1, [b["metadata"]["name"] for b in budgets]
    spec = budgets[0]["spec"]
    assert not [name for name, pod in pods.items() if selects(spec["selector"], pod.labels)], "it counts Ray pods"
    assert selects(proxy_deployment["spec"]["selector"], proxy.labels)
    replicas = proxy_deployment["spec"]["replicas"]
    # a Deployment has the scale subresource: maxUnavailable is fine here; one proxy keeps serving in a drain
    allowed = spec["maxUnavailable"] if "maxUnavailable" in spec else replicas - spec["minAvailable"]
    assert replicas >= 2 and 1 <= allowed < replicas, (replicas, spec)
    assert spec.get("unhealthyPodEvictionPolicy") == "AlwaysAllow"


# ---- network policies: structure -------------------------------------------------------------------------------------

def test_ray_ports_are_fixed_and_the_same_on_every_node(rayservice: dict[str, Any], ray_ports: dict[str, int],
                                                        serve_config: dict[str, Any]) -> None:
    cluster = _cluster(rayservice)
    nodes = {"head": cluster["headGroupSpec"], **_groups(rayservice)}
    for name, spec in nodes.items():
        params = spec["rayStartParams"]
        missing = [k for k in RAY_PORT_PARAMS if k not in params]
        assert not missing, f"{name}: Ray picks these at random unless rayStartParams fixes them: {missing}"
        assert {k: int(params[k]) for k in RAY_PORT_PARAMS} == {k: ray_ports[k] for k in RAY_PORT_PARAMS}, \
            f"{name}: its Ray ports differ from the head's (the policies name one number each)"
    lo, hi = ray_ports["min-worker-port"], ray_ports["max-worker-port"]
    assert 1024 <= lo < hi <= 65535
    metrics = int(cluster["headGroupSpec"]["rayStartParams"]["metrics-export-port"])
    singles = [v for k, v in ray_ports.items() if k not in ("min-worker-port", "max-worker-port")]
    singles += [serve_config["http_options"]["port"], metrics, *HEAD_ONLY_PORTS.values()]
    assert len(set(singles)) == len(singles), f"two Ray ports collide: {sorted(singles)}"
    assert not [p for p in singles if lo <= p <= hi], "a fixed port inside the worker port range"
    head_ports = {p["name"]: p["containerPort"] for p in cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
                  ["ports"]}
    assert head_ports["gcs-server"] == ray_ports["port"]


def test_policy_rules_name_their_peers_and_numeric_ports(policies: list[dict[str, Any]], pods: dict[str, Pod],
                                                         proxy: Pod, proxy_port: int) -> None:
    for policy in policies:
        spec, name = policy["spec"], policy["metadata"]["name"]
        assert "policyTypes" in spec, f"{name}: say policyTypes (the default depends on which rules are present)"
        assert "ray.io/cluster" not in json.dumps(spec), f"{name}: ray.io/cluster changes with every cluster upgrade"
        for rule in spec.get("egress", []):
            assert rule.get("to"), f"{name}: an egress rule without `to` is open to every destination"
            assert rule.get("ports"), f"{name}: an egress rule without ports opens every port"
        for rule in spec.get("ingress", []):
            assert rule.get("ports"), f"{name}: an ingress rule without ports opens every port"
            if not rule.get("from"):
                # the one entry: the front proxy's HTTP port, on the proxy pods alone
                assert rule["ports"] == [{"protocol": "TCP", "port": proxy_port}], \
                    f"{name}: only the front proxy's HTTP port ({proxy_port}) is open to every source"
                assert selects(spec["podSelector"], proxy.labels) and not any(
                    selects(spec["podSelector"], pod.labels) for pod in pods.values()), \
                    f"{name}: a rule open to every source must select the front proxy's pods only"
        for rule in [*spec.get("egress", []), *spec.get("ingress", [])]:
            assert all(isinstance(p.get("port"), int) for p in rule["ports"]), f"{name}: ports are numbers"
            for peer in rule.get("to", rule.get("from")) or []:
                block = peer.get("ipBlock", {})
                for cidr in [block["cidr"], *block.get("except", [])] if block else []:
                    network = ipaddress.ip_network(cidr, strict=False)
                    assert str(network) == cidr, f"{name}: write {cidr} as {network} (no host bits, canonical form)"
                for cidr in block.get("except", []):
                    assert ipaddress.ip_network(cidr).subnet_of(ipaddress.ip_network(block["cidr"])), \
                        f"{name}: except {cidr} lies outside {block['cidr']} (the API server refuses it)"


def test_worker_pods_are_isolated_both_ways_and_the_head_is_not(policies: list[dict[str, Any]],
                                                                 pods: dict[str, Pod], workers: list[str],
                                                                 proxy: Pod) -> None:
    for name, pod in [*((n, pods[n]) for n in workers), ("the front proxy", proxy)]:
        for direction in ("Ingress", "Egress"):
            assert isolating(policies, pod, direction), f"no NetworkPolicy selects {name} for {direction}"
    # the head's autoscaler calls the Kubernetes API and its GCS (and the cleanup Job) talk to Redis
    for name in ("head", "redis-cleanup"):
        assert not isolating(policies, pods[name], "Egress"), f"a policy restricts the egress of {name}"


# ---- network policies: connections -----------------------------------------------------------------------------------

def test_workers_resolve_names(policies: list[dict[str, Any]], pods: dict[str, Pod], workers: list[str]) -> None:
    for name in workers:
        for protocol in ("UDP", "TCP"):
            assert allows(policies, pods[name], DNS, 53, protocol), f"{name}: DNS over {protocol}"


def test_ray_reaches_every_worker_on_its_ports(policies: list[dict[str, Any]], pods: dict[str, Pod],
                                               workers: list[str], ray_ports: dict[str, int]) -> None:
    ray_pods = ["head", *workers]
    for src in ray_pods:
        for dst in workers:
            for port in _node_ports(ray_ports):
                assert allows(policies, pods[src], pods[dst], port), f"Ray {src} -> {dst}:{port}"
    for src in workers:
        assert allows(policies, pods[src], pods["head"], ray_ports["port"]), f"{src} -> GCS"
        for port in _node_ports(ray_ports):
            assert allows(policies, pods[src], pods["head"], port), f"Ray {src} -> head:{port}"


def test_ray_ports_are_closed_to_everyone_else(policies: list[dict[str, Any]], pods: dict[str, Pod],
                                               workers: list[str], ray_ports: dict[str, int]) -> None:
    for name in workers:
        namespace, labels = pods[name].namespace, pods[name].labels
        strangers = {"a pod of the namespace without our app label": Pod(namespace, {"app": "debug"}),
                     "a pod with our labels in another namespace": Pod("default", labels),
                     "an address outside the cluster": CLIENT}
        for what, stranger in strangers.items():
            for port in [*_node_ports(ray_ports), ray_ports["port"]]:
                assert not allows(policies, stranger, pods[name], port), f"{what} -> {name}:{port}"
                assert not allows(policies, pods[name], stranger, port), f"{name} -> {what}:{port}"
        assert not allows(policies, pods["head"], pods[name], ray_ports["max-worker-port"] + 1)
        for what, port in HEAD_ONLY_PORTS.items():
            assert not allows(policies, pods[name], pods["head"], port), f"{name} -> the head's {what} port"


def test_clients_reach_the_api_through_the_front_proxy_only(policies: list[dict[str, Any]], pods: dict[str, Pod],
                                                             workers: list[str], serve_config: dict[str, Any],
                                                             ray_ports: dict[str, int], proxy: Pod,
                                                             proxy_port: int) -> None:
    # KubeRay's Serve Service sends to each worker with a healthy Serve proxy (proxy_location EveryNode)
    assert serve_config["proxy_location"] == "EveryNode"
    serve_port = serve_config["http_options"]["port"]
    in_cluster = Pod(proxy.namespace, {"app": "debug"})
    assert allows(policies, CLIENT, proxy, proxy_port), "clients -> the front proxy"
    assert allows(policies, in_cluster, proxy, proxy_port), "pods of the cluster -> the front proxy"
    assert not allows(policies, CLIENT, proxy, proxy_port + 1), "only the proxy's HTTP port is open"
    for name in workers:
        assert allows(policies, proxy, pods[name], serve_port), f"front proxy -> {name}:{serve_port}"
        # nobody else reaches Serve HTTP: not a client, not another pod, not a proxy-labelled pod elsewhere
        for what, stranger in {"a client": CLIENT, "a pod of the namespace": in_cluster,
                               "a pod with the proxy's labels in another namespace": Pod("default", proxy.labels)
                               }.items():
            assert not allows(policies, stranger, pods[name], serve_port), f"{what} -> {name}:{serve_port}"
        assert not allows(policies, CLIENT, pods[name], ray_ports["node-manager-port"]), name
        for port in _node_ports(ray_ports):
            assert not allows(policies, proxy, pods[name], port), f"front proxy -> {name}'s Ray port {port}"


def test_the_front_proxy_reaches_dns_and_serve_http_only(policies: list[dict[str, Any]], pods: dict[str, Pod],
                                                          serve_config: dict[str, Any], ray_ports: dict[str, int],
                                                          proxy: Pod) -> None:
    for protocol in ("UDP", "TCP"):
        assert allows(policies, proxy, DNS, 53, protocol), f"front proxy: DNS over {protocol}"
    serve_port = serve_config["http_options"]["port"]
    # the head is not behind videogen-serve-svc (excludeHeadPodFromServeSvc) and its ports are Ray's
    for port in (serve_port, ray_ports["port"], *HEAD_ONLY_PORTS.values()):
        assert not allows(policies, proxy, pods["head"], port), f"front proxy -> head:{port}"
    for dst in (*PUBLIC, External("10.0.12.34")):
        for port in (80, 443, serve_port):
            assert not allows(policies, proxy, dst, port), f"front proxy -> {dst.ip}:{port}"


def test_prometheus_scrapes_the_metrics_port(policies: list[dict[str, Any]], pods: dict[str, Pod],
                                             rayservice: dict[str, Any], workers: list[str],
                                             ray_ports: dict[str, int]) -> None:
    head = _cluster(rayservice)["headGroupSpec"]
    env = {e["name"]: e.get("value") for e in head["template"]["spec"]["containers"][0]["env"]}
    monitoring = urlsplit(env["RAY_PROMETHEUS_HOST"]).hostname.split(".")[1]  # <service>.<namespace>.svc
    prometheus = Pod(monitoring, {"app.kubernetes.io/name": "prometheus", "prometheus": "kube-prometheus-stack"})
    for name in workers:
        metrics = int(_groups(rayservice)[name]["rayStartParams"]["metrics-export-port"])
        assert allows(policies, prometheus, pods[name], metrics), f"Prometheus ({monitoring}) -> {name}:{metrics}"
        impostor = Pod("default", prometheus.labels)
        assert not allows(policies, impostor, pods[name], metrics), f"a scraper outside {monitoring} -> {name}"
        assert not allows(policies, prometheus, pods[name], ray_ports["node-manager-port"]), name


def _ip_blocks(policy: dict[str, Any]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(peer["ipBlock"]["cidr"]) for rule in policy["spec"].get("egress", [])
            for peer in rule.get("to", []) if "ipBlock" in peer]


def test_s3_and_sts_go_to_the_overlays_addresses(objects: tuple[dict[str, Any], ...],
                                                 policies: list[dict[str, Any]], pods: dict[str, Pod],
                                                 workers: list[str], gpu_groups: list[str], overlay: str) -> None:
    require_kubectl()
    base = _ip_blocks(_named(render(K8S / "base"), "NetworkPolicy", AWS_POLICY))
    assert base and all(net.subnet_of(PLACEHOLDER) for net in base), \
        f"the base's S3/STS address must be the placeholder {PLACEHOLDER} (fails closed), got {base}"
    policy = _named(objects, "NetworkPolicy", AWS_POLICY)
    blocks = _ip_blocks(policy)
    assert blocks and not set(blocks) & set(base), \
        f"overlays/{overlay}/networkpolicy-aws.yaml must replace the base's placeholder {base}, got {blocks}"
    for rule in policy["spec"]["egress"]:
        assert rule["ports"] == [{"protocol": "TCP", "port": 443}], rule
        assert all(set(peer) == {"ipBlock"} and not peer["ipBlock"].get("except") for peer in rule["to"]), rule
    assert all(net.prefixlen > 0 for net in blocks), "S3/STS addresses, not the whole internet"
    for name in workers:
        for net in blocks:
            host = External(str(next(net.hosts(), net.network_address)))
            assert allows(policies, pods[name], host, 443), f"{name} -> S3/STS {net}"
            assert not allows(policies, pods[name], host, 80), f"{name} -> {net}:80"
    for name in gpu_groups:
        assert not allows(policies, pods[name], PUBLIC[0], 443), f"{name} reaches the internet"


def test_webhooks_leave_from_the_ingress_group_only(objects: tuple[dict[str, Any], ...],
                                                    policies: list[dict[str, Any]], pods: dict[str, Pod],
                                                    workers: list[str], ingress_group: str,
                                                    app_config: AppConfig) -> None:
    assert app_config.webhooks.require_https, "the policy opens HTTPS (443) only"
    for name in workers:
        for dst in PUBLIC:
            assert allows(policies, pods[name], dst, 443) == (name == ingress_group), f"{name} -> {dst.ip}:443"
    aws = _ip_blocks(_named(objects, "NetworkPolicy", AWS_POLICY))
    source = pods[ingress_group]
    for ip in NOT_PUBLIC:
        if any(ipaddress.ip_address(ip) in net for net in aws):
            continue  # an S3/STS endpoint the overlay allows on purpose
        assert not allows(policies, source, External(ip), 443), f"{ingress_group} -> {ip}:443"
    assert not allows(policies, source, PUBLIC[0], 80), "plain HTTP webhooks are refused"
    # the app refuses at registration what the policy would silently drop: ports other than the policy's
    assert app_config.webhooks.allowed_ports, "webhooks.allowed_ports must be set to what the egress policy opens"
    for port in app_config.webhooks.allowed_ports:
        assert allows(policies, source, PUBLIC[0], port), f"webhooks.allowed_ports has {port}, the policy drops it"


def test_only_the_head_side_reaches_redis(rayservice: dict[str, Any], policies: list[dict[str, Any]],
                                          pods: dict[str, Pod], workers: list[str], overlay: str) -> None:
    ft = _cluster(rayservice).get("gcsFaultToleranceOptions")
    assert (ft is not None) == (overlay in PROD_OVERLAYS), "GCS fault tolerance (Redis) in prod (and its variants) only"
    address = ft["redisAddress"] if ft else "videogen-redis:6379"
    port = urlsplit(address if "://" in address else f"redis://{address}").port or 6379
    redis = External("10.0.12.34")  # e.g. ElastiCache behind the ExternalName Service videogen-redis
    for name in ("head", "redis-cleanup"):
        assert allows(policies, pods[name], redis, port), f"{name} (GCS / cleanup Job) -> Redis"
    for name in workers:
        assert not allows(policies, pods[name], redis, port), f"{name} never talks to Redis"


# ---- the model of NetworkPolicy itself ----------------------------------------------------------------------------

def _policy(spec: dict[str, Any], namespace: str = "ns") -> dict[str, Any]:
    return {"metadata": {"name": "p", "namespace": namespace}, "spec": spec}


def test_netpol_model_follows_the_api() -> None:
    a, b = Pod("ns", {"app": "a"}), Pod("ns", {"app": "b"})
    other = Pod("other", {"app": "b"})
    # not isolated without a policy; an ingress-only policy leaves egress open
    assert allows([], a, b, 1)
    deny_in = _policy({"podSelector": {"matchLabels": {"app": "b"}}})
    assert policy_types(deny_in) == ["Ingress"]
    assert not allows([deny_in], a, b, 1) and allows([deny_in], b, a, 1)
    # both ends count: a's egress allows b, b's ingress does not
    egress = _policy({"podSelector": {"matchLabels": {"app": "a"}}, "policyTypes": ["Egress"],
                      "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "b"}}}]}]})
    assert not allows([egress, deny_in], a, b, 1) and allows([egress], a, b, 1)
    assert not allows([egress], a, other, 1), "a podSelector alone means the policy's namespace"
    # namespaceSelector + podSelector in one peer: both; in two peers: either
    both = _policy({"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [{"from": [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "other"}},
         "podSelector": {"matchLabels": {"app": "a"}}}]}]})
    either = _policy({"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [{"from": [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "other"}}},
        {"podSelector": {"matchLabels": {"app": "a"}}}]}]})
    assert not allows([both], other, a, 1) and allows([either], other, a, 1) and allows([either], a, b, 1)
    # ports: protocol, endPort; ipBlock with except, external addresses only
    ranged = _policy({"podSelector": {}, "policyTypes": ["Egress"], "egress": [
        {"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}],
         "ports": [{"protocol": "TCP", "port": 100, "endPort": 200}]}]})
    assert allows([ranged], a, External("10.2.0.1"), 200) and not allows([ranged], a, External("10.2.0.1"), 201)
    assert not allows([ranged], a, External("10.1.0.1"), 150) and not allows([ranged], a, External("10.2.0.1"), 150,
                                                                             "UDP")
    assert not allows([ranged], a, b, 150), "ipBlock does not match pods here"
    # matchExpressions
    assert selects({"matchExpressions": [{"key": "app", "operator": "In", "values": ["a"]}]}, a.labels)
    assert not selects({"matchExpressions": [{"key": "app", "operator": "DoesNotExist"}]}, a.labels)
