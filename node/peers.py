"""Who may associate with the node's Storage SCP, and what each peer may do (``node.peers``).

A peer is a calling AE title, optionally bound to an address (IP, CIDR network or host name), with
the DIMSE services it may invoke. The dimse destinations (the PACS, ``priors.source``) are peers
too without being listed: they push to us (C-MOVE sub-operations, a PACS forwarding results), so
each gets ``echo`` and ``store`` from its own ``host``.

:meth:`PeerTable.admit` decides at A-ASSOCIATE-RQ time; the receiver (:mod:`node.receive.scp`)
rejects the association when it says no, and checks each C-ECHO/C-STORE against the services it
granted. Pure logic plus a resolver (host names are resolved at each association, so a peer whose
address changes in DNS is followed); no sockets are opened here.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from node.config import DimseDestination, Peer, Settings

IMPLICIT_SERVICES: frozenset[str] = frozenset({"echo", "store"})
"""What a dimse destination may do without being listed in ``node.peers``."""
UNKNOWN_PEER_SERVICES: frozenset[str] = frozenset({"echo", "store"})
"""What an unknown calling AE may do with ``node.accept_unknown_peers: true``."""

REASON_UNKNOWN_AE = "calling AE title not recognised"
REASON_ADDRESS = "calling AE title not recognised from this address"

Resolver = Callable[[str], set[str]]
"""Host name -> the IP addresses it resolves to (empty when it does not resolve)."""


def resolve(host: str) -> set[str]:
    """The addresses ``host`` resolves to (A and AAAA records, /etc/hosts); empty on failure."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return set()
    return {_normalise(str(info[4][0])) for info in infos}


def _normalise(address: str) -> str:
    """An IP address in canonical form; IPv4-mapped IPv6 (``::ffff:10.0.0.1``) as IPv4."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


@dataclass(frozen=True)
class PeerRule:
    """One entry: an AE title from an address (None: any) may use ``allow``."""

    ae_title: str
    host: str | None
    allow: frozenset[str]
    source: str
    """Where it comes from (``node.peers[2]``, ``destinations[pacs]``): for logs and tests."""

    def matches_address(self, address: str, resolver: Resolver) -> bool:
        if self.host is None:
            return True
        try:
            ip = ipaddress.ip_address(_normalise(address))
        except ValueError:
            return False
        if "/" in self.host:
            return ip in ipaddress.ip_network(self.host)
        try:
            return ip == ipaddress.ip_address(self.host)
        except ValueError:  # a host name
            return str(ip) in resolver(self.host)


@dataclass(frozen=True)
class Admission:
    """The decision for one association: ``allow`` the services granted, or None and a ``reason``."""

    allow: frozenset[str] | None
    reason: str = ""

    @property
    def accepted(self) -> bool:
        return self.allow is not None


class PeerTable:
    """The peers of ``node.peers`` plus the implicit ones (dimse destinations)."""

    def __init__(self, rules: Iterable[PeerRule], *, accept_unknown: bool = False,
                 resolver: Resolver = resolve) -> None:
        self.rules = tuple(rules)
        self.accept_unknown = accept_unknown
        self.resolver = resolver

    @classmethod
    def from_settings(cls, settings: Settings, resolver: Resolver = resolve) -> PeerTable:
        rules = [_rule(p, f"node.peers[{i}]") for i, p in enumerate(settings.node.peers)]
        rules += [PeerRule(d.ae_title.strip(), _destination_host(d.host), IMPLICIT_SERVICES, f"destinations[{d.name}]")
                  for d in settings.destinations if isinstance(d, DimseDestination) and d.host.strip()]
        return cls(rules, accept_unknown=settings.node.accept_unknown_peers, resolver=resolver)

    def admit(self, calling_ae: str, address: str) -> Admission:
        """May ``calling_ae`` connecting from ``address`` associate, and do what?

        Every entry of the AE title whose host matches adds its services. An AE title with entries,
        none of which matches the address, is refused even with ``accept_unknown`` (an impostor of a
        known AE); an AE title without entries is refused unless ``accept_unknown``.
        """
        calling_ae = calling_ae.strip()
        entries = [r for r in self.rules if r.ae_title == calling_ae]
        if not entries:
            if self.accept_unknown:
                return Admission(UNKNOWN_PEER_SERVICES)
            return Admission(None, REASON_UNKNOWN_AE)
        granted: set[str] = set()
        matched = False
        for rule in entries:
            if rule.matches_address(address, self.resolver):
                matched = True
                granted |= rule.allow
        if not matched:
            return Admission(None, REASON_ADDRESS)
        return Admission(frozenset(granted))


def _rule(peer: Peer, source: str) -> PeerRule:
    return PeerRule(peer.ae_title.strip(), peer.host, frozenset(peer.allow), source)


def _destination_host(host: str) -> str:
    """A destination's ``host`` as a peer host: an IP address or a host name (resolved when matched)."""
    host = host.strip()
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host.lower()
