"""SSRF guard for webhook URLs: checked at registration and before every attempt, pinned to the checked IP.

A URL is refused when it names this machine, a metadata service or a non-public address (unless allow-listed);
the attempt then connects to the very address that was checked, so DNS rebinding has no window.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from serve.config.webhooks import WebhookConfig
from serve.errors import ServiceError

Resolver = Callable[..., Sequence[tuple[Any, ...]]]  # socket.getaddrinfo's shape

# Names that only ever mean "this machine" or "the cloud's metadata service"; refused before any DNS lookup.
_BLOCKED_NAMES = frozenset({"localhost", "metadata", "metadata.google.internal", "metadata.goog",
                            "instance-data", "instance-data.ec2.internal"})
_BLOCKED_SUFFIXES = (".localhost", ".internal", ".local", ".home.arpa")
# Metadata / platform endpoints; some (Azure's wire server) are globally routable addresses.
_METADATA_IPS = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254", "168.63.129.16", "100.100.100.200", "fd00:ec2::254", "192.0.0.192"))
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_IETF_V4 = ipaddress.ip_network("192.0.0.0/24")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
_V4_COMPAT = ipaddress.ip_network("::/96")
_TEREDO = ipaddress.ip_network("2001::/32")
_NUMERIC_LABEL = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$", re.IGNORECASE)
_HOST_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")
_DEFAULT_PORTS = {"http": 80, "https": 443}


# ---- URL checks ---------------------------------------------------------------------------------------------------


class _UrlProblem(Exception):
    """What is wrong with a webhook URL; `transient` problems (DNS failures) may clear on a later attempt."""

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.transient = transient


@dataclass(frozen=True)
class _Target:
    """A checked URL: where to connect (`addresses`, all checked) and what to tell the server (`host_header`)."""

    scheme: str
    host: str  # normalised: lowercase IDNA name or canonical IP, no brackets
    port: int
    path: str  # path + query, as given
    addresses: tuple[str, ...]
    is_ip_literal: bool

    @property
    def host_header(self) -> str:
        h = f"[{self.host}]" if ":" in self.host else self.host
        return h if _DEFAULT_PORTS[self.scheme] == self.port else f"{h}:{self.port}"

    def pinned_url(self) -> str:
        ip = self.addresses[0]
        netloc = f"[{ip}]" if ":" in ip else ip
        return f"{self.scheme}://{netloc}:{self.port}{self.path}"


def _legacy_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """`inet_aton` forms (2130706433, 0x7f.1, 0177.0.0.1, 127.1) as the address they mean; None for names.

    Parsed here rather than by `socket.inet_aton`, whose leniency differs between C libraries. Like the WHATWG
    URL parser, a host whose last label is numeric is an IPv4 address or invalid, never a name.
    """
    labels = host.split(".")
    if not _NUMERIC_LABEL.match(labels[-1]):
        return None
    if len(labels) > 4 or not all(_NUMERIC_LABEL.match(p) for p in labels):
        raise _UrlProblem(f"host {host!r} is neither a host name nor a valid IPv4 address")
    values = []
    for p in labels:
        if p[:2].lower() == "0x":
            values.append(int(p[2:] or "0", 16))
        elif len(p) > 1 and p.startswith("0"):
            if any(c not in "01234567" for c in p):
                raise _UrlProblem(f"host {host!r} has an invalid octal part {p!r}")
            values.append(int(p, 8))
        else:
            values.append(int(p))
    *head, last = values
    if any(v > 255 for v in head) or last >= 256 ** (5 - len(values)):
        raise _UrlProblem(f"host {host!r} is out of the IPv4 range")
    n = last
    for i, v in enumerate(head):
        n |= v << (8 * (3 - i))
    return ipaddress.IPv4Address(n)


def _special_use_problem(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """The special-use kinds that IPv4 and IPv6 share (checked first by both)."""
    if ip in _METADATA_IPS:
        return "a cloud metadata endpoint"
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    return None


def _v4_problem(ip: ipaddress.IPv4Address) -> str | None:
    if problem := _special_use_problem(ip):
        return problem
    if ip in _CGNAT:
        return "shared address space (CGNAT 100.64.0.0/10)"
    if ip.is_reserved:  # before is_private, which also covers 240.0.0.0/4
        return "reserved"
    if ip.is_private or ip in _IETF_V4:
        return "private"
    if not ip.is_global:
        return "not globally routable"
    return None


def address_problem(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why `ip` is not a public unicast address a webhook may reach; None when it is."""
    if isinstance(ip, ipaddress.IPv4Address):
        return _v4_problem(ip)
    ip = ipaddress.IPv6Address(ip.compressed.split("%")[0])  # drop a scope id
    embedded: tuple[str, ipaddress.IPv4Address] | None = None
    if ip.ipv4_mapped is not None:
        embedded = ("IPv4-mapped", ip.ipv4_mapped)
    elif ip.sixtofour is not None:
        embedded = ("6to4", ip.sixtofour)
    elif ip in _NAT64:
        embedded = ("NAT64", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    elif ip in _V4_COMPAT and int(ip) > 1:
        embedded = ("IPv4-compatible", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    if embedded is not None:
        kind, v4 = embedded
        inner = _v4_problem(v4)
        if inner:
            return f"{kind} IPv6 embedding {v4} ({inner})"
        if kind == "IPv4-compatible":
            return "IPv4-compatible IPv6 (deprecated)"
        return None
    if problem := _special_use_problem(ip):
        return problem
    if ip.is_site_local:
        return "site-local"
    if ip in _TEREDO:
        return "a Teredo tunnel address"
    if ip in _NAT64_LOCAL:
        return "local-use NAT64"
    if ip.is_private:
        return "private"
    if ip.is_reserved:
        return "reserved"
    if not ip.is_global:
        return "not globally routable"
    return None


def _allow_listed(cfg: WebhookConfig, host: str, port: int) -> bool:
    h = f"[{host}]" if ":" in host else host
    return h in cfg.allow_hosts or f"{h}:{port}" in cfg.allow_hosts


def _resolve(resolver: Resolver, host: str, port: int) -> list[str]:
    try:
        infos = resolver(host, port, 0, socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise _UrlProblem(f"host {host!r} does not resolve ({exc})", transient=True) from None
    addresses = list(dict.fromkeys(str(info[4][0]).split("%")[0] for info in infos))
    if not addresses:
        raise _UrlProblem(f"host {host!r} resolves to no address", transient=True)
    return addresses


def check_url(url: str, cfg: WebhookConfig, resolver: Resolver = socket.getaddrinfo,
              what: str = "webhook_url") -> _Target:
    """Parse, normalise and (unless allow-listed) check every address `url` resolves to; raises _UrlProblem,
    whose message names the URL as `what` (the request field it came in: webhook_url, or an image's URL).

    Blocking (DNS): call it through `asyncio.to_thread` from async code.
    """
    # 1. shape of the URL
    if not isinstance(url, str) or not url:
        raise _UrlProblem(f"{what} must be a non-empty string")
    if len(url) > cfg.max_url_chars:
        raise _UrlProblem(f"{what} is {len(url)} characters long; at most {cfg.max_url_chars} are accepted")
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        raise _UrlProblem(f"{what} must not contain whitespace or control characters")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise _UrlProblem(f"{what} must use https (or http where allowed), got scheme {parts.scheme!r}")
    if scheme == "http" and cfg.require_https:
        raise _UrlProblem(f"{what} must use https")
    if "@" in parts.netloc:
        raise _UrlProblem(f"{what} must not carry credentials (user:password@)")
    try:
        port = parts.port or _DEFAULT_PORTS[scheme]
    except ValueError:
        raise _UrlProblem(f"{what} has an invalid port in {parts.netloc!r}") from None
    if parts.port == 0 or (cfg.allowed_ports and port not in cfg.allowed_ports):
        allowed = ", ".join(map(str, cfg.allowed_ports)) or "1..65535"
        raise _UrlProblem(f"{what} port {port} is not accepted (allowed: {allowed})")
    raw_host = (parts.hostname or "").rstrip(".")
    if not raw_host:
        raise _UrlProblem(f"{what} has no host")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")

    # 2. the host: an IP literal (any spelling) or a host name
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None
    if ":" in raw_host:
        try:
            ip = ipaddress.IPv6Address(raw_host.split("%")[0])
        except ValueError:
            raise _UrlProblem(f"host {raw_host!r} is not a valid IPv6 address") from None
    else:
        try:
            host_ascii = raw_host.encode("idna").decode("ascii").lower()
        except UnicodeError:
            raise _UrlProblem(f"host {raw_host!r} is not a valid host name") from None
        ip = _legacy_ipv4(host_ascii)
        if ip is None and (len(host_ascii) > 253 or not all(_HOST_LABEL.match(lbl)
                                                               for lbl in host_ascii.split("."))):
            raise _UrlProblem(f"host {raw_host!r} is not a valid host name")
    host = ip.compressed if ip is not None else host_ascii
    listed = _allow_listed(cfg, host, port)

    # 3. where it leads: every address must be public, unless the host is allow-listed
    if ip is not None:
        addresses = [ip.compressed]
    else:
        if not listed and (host in _BLOCKED_NAMES or host.endswith(_BLOCKED_SUFFIXES)):
            raise _UrlProblem(f"host {host!r} is an internal or metadata name")
        addresses = _resolve(resolver, host, port)
    if not listed:
        for a in addresses:
            try:
                problem = address_problem(ipaddress.ip_address(a))
            except ValueError:
                problem = "not an IP address"
            if problem:
                via = "" if ip is not None else f" resolves to {a}, which"
                raise _UrlProblem(f"host {host!r}{via} is {problem}; {what} must lead to a public address")
    return _Target(scheme, host, port, path, tuple(addresses), ip is not None)


def validate_webhook_url(url: str, cfg: WebhookConfig, resolver: Resolver = socket.getaddrinfo) -> None:
    """Refuse a webhook URL that is malformed or leads to a non-public address: ServiceError 400 (param webhook_url).

    Blocking (DNS): call it through `asyncio.to_thread` from async code.
    """
    try:
        check_url(url, cfg, resolver)
    except _UrlProblem as p:
        raise ServiceError(400, p.message, param="webhook_url", code="invalid_webhook_url") from None


def redact_url(url: str) -> str:
    """scheme://host[:port]/… for logs: paths and queries often carry tokens."""
    try:
        p = urlsplit(url)
        return f"{p.scheme}://{p.hostname}{f':{p.port}' if p.port else ''}/…"
    except ValueError:
        return "<invalid url>"


