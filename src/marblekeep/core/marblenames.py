"""Which DNS names and IP addresses a Marble may put in its certificate (issue 11, finding 9).

A Marble's leaf certificate chains to the Coordinator root (through the intermediate, which shares
the Marble root's key) and carries serverAuth. A client that trusts the root as a CA — ``curl
--cacert root.pem``, MarbleRun's CLI — therefore accepts a Marble certificate for any name in it.
MarbleRun lets a Marble choose its names freely, so a Marble could name itself as the Coordinator
and impersonate it to such clients.

Rule: a Marble may not request a name that a Coordinator name would match — the names of
``EDG_COORDINATOR_DNS_NAMES`` and the SANs of the Coordinator root (which the listener certificate
carries too) — including through a wildcard on either side. DNS names compare case-insensitively
and without a trailing dot; IP addresses compare as addresses (``::ffff:10.0.0.1`` is
``10.0.0.1``).

Exception, on purpose: loopback. ``localhost``, ``*.localhost`` and loopback addresses
(127.0.0.0/8, ::1) stay allowed, because every MarbleRun and marblekeep premain asks for
``localhost`` by default and every Marble certificate carries 127.0.0.1 and ::1, as in MarbleRun.
The remaining exposure is documented in docs/key-hierarchy.md: over a loopback address, a client
that trusts the root as a CA cannot tell the Coordinator from a Marble; marblekeep's CLI and SDK
can (they require a certificate signed directly by the root). Pure: no I/O.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cryptography import x509

from marblekeep.errors import ActivationRefused

__all__ = ["CoordinatorNames", "check_marble_names", "coordinator_names"]

_Ip = ipaddress.IPv4Address | ipaddress.IPv6Address


def _as_ip(name: str) -> _Ip | None:
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            return None  # certificates carry such an entry as a (strange) DNS name
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
    return ip


def _dns(name: str) -> str:
    return name.lower().rstrip(".")


def _is_loopback_name(name: str) -> bool:
    return name == "localhost" or name.endswith(".localhost")


@dataclass(frozen=True)
class CoordinatorNames:
    """The Coordinator's own names (loopback excluded): DNS names (normalised) and IP addresses."""

    dns: frozenset[str]
    ips: frozenset[_Ip]

    def describe(self) -> str:
        names = sorted(self.dns) + sorted(str(ip) for ip in self.ips)
        return ", ".join(names) if names else "none besides loopback"


def coordinator_names(root: x509.Certificate | None, configured: Iterable[str]) -> CoordinatorNames:
    """The names of ``configured`` (EDG_COORDINATOR_DNS_NAMES) and of the root's SANs."""
    dns: set[str] = set()
    ips: set[_Ip] = set()

    def add(name: str) -> None:
        ip = _as_ip(name)
        if ip is not None:
            if not ip.is_loopback:
                ips.add(ip)
        elif not _is_loopback_name(_dns(name)) and _dns(name):
            dns.add(_dns(name))

    for name in configured:
        add(name)
    if root is not None:
        try:
            san = root.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            san = x509.SubjectAlternativeName([])
        for value in san.get_values_for_type(x509.DNSName):
            add(value)
        for address in san.get_values_for_type(x509.IPAddress):
            add(str(address))
    return CoordinatorNames(frozenset(dns), frozenset(ips))


def _overlap(a: str, b: str) -> bool:
    """True when DNS patterns ``a`` and ``b`` (single-label ``*`` wildcards) can match one host name."""
    if a == b:
        return True
    la, lb = a.split("."), b.split(".")
    if len(la) != len(lb):
        return False
    return all("*" in (x, y) or x == y for x, y in zip(la, lb, strict=True))


def check_marble_names(requested: Sequence[str], reserved: CoordinatorNames) -> None:
    """Refuse (``dns_names``) a requested name that one of the Coordinator's names would match."""
    taken: list[str] = []
    for name in requested:
        ip = _as_ip(name)
        if ip is not None:
            if not ip.is_loopback and ip in reserved.ips:
                taken.append(name)
            continue
        dns = _dns(name)
        if _is_loopback_name(dns):
            continue
        if any(_overlap(dns, own) for own in reserved.dns):
            taken.append(name)
    if taken:
        listed = ", ".join(repr(n[:80]) for n in taken[:4]) + (", …" if len(taken) > 4 else "")
        raise ActivationRefused(
            f"the Marble asks for DNS names or IP addresses of the Coordinator itself ({listed}): a Marble "
            "certificate for them could impersonate the Coordinator to clients that trust its root. Choose "
            "other names in EDG_MARBLE_DNS_NAMES (the Coordinator's names: "
            f"{reserved.describe()}; localhost and loopback addresses are allowed)",
            reason="dns_names",
        )
