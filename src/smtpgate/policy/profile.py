"""Which connection profile applies to a client?

The manual's order, kept here:

1. The client IP address: among the profiles' IP and CIDR entries the most
   specific one wins (an exact address is a /32 or /128, so it always beats
   a range). IPv4-mapped IPv6 addresses are matched as IPv4, the client's
   and the entries' alike (``::ffff:10.0.0.5`` in ``client_hosts`` is
   ``10.0.0.5``), as the duplicate check compares them.
2. The client's host name, but only a forward-confirmed one (reverse DNS
   gives the name, and the name's A/AAAA records contain the address):
   a name that does not confirm never matches.
3. Otherwise the default profile.

The sender domain (at MAIL FROM) can select a profile too, but only to
require inbound TLS; it never changes relay or authentication
(:func:`match_sender_domain`).
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from smtpgate.config.schema import GatewayConfig, RelayMode
from smtpgate.config.validate import client_network

Step = Literal["client-ip", "host-name", "sender-domain", "connector", "default"]
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class Profile:
    """What policy reads from a connection profile (or the default profile)."""

    name: str
    relay: RelayMode
    mandatory_tls: bool
    is_default: bool = False

    @property
    def label(self) -> str:
        return "the default profile" if self.is_default else f"connection profile {self.name!r}"


@dataclass(frozen=True, slots=True)
class ProfileMatch:
    """A profile and how it was found."""

    profile: Profile
    step: Step
    entry: str | None = None  # the client_hosts or sender_domains entry

    def reason(self) -> str:
        if self.step == "client-ip":
            return f"{self.profile.label}: client IP matches {self.entry}"
        if self.step == "host-name":
            return f"{self.profile.label}: confirmed host name {self.entry}"
        if self.step == "connector":
            return f"{self.profile.label}: chosen by receive connector {self.entry}"
        if self.step == "sender-domain":
            return f"{self.profile.label}: sender domain {self.entry} (inbound TLS only)"
        return f"{self.profile.label}: no profile matches the client IP or host name"


@functools.lru_cache(maxsize=4096)  # once per connection, or more: the same few clients
def client_address(text: str) -> IpAddress:
    """Parse a client address; IPv4-mapped IPv6 becomes IPv4, a zone id is dropped."""
    address = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class ProfileIndex:
    """The profiles of one configuration, indexed for matching."""

    def __init__(self, config: GatewayConfig) -> None:
        dp = config.default_profile
        self.default = Profile("default", dp.relay, dp.inbound_tls.mandatory, is_default=True)
        self.profiles: dict[str, Profile] = {}
        self._networks: dict[tuple[int, int], dict[int, tuple[Profile, str]]] = {}
        self.host_names: dict[str, Profile] = {}
        self.sender_domains: dict[str, Profile] = {}
        for item in config.connection_profiles:
            profile = Profile(item.name, item.relay, item.inbound_tls.mandatory)
            self.profiles[item.name] = profile
            for entry in item.client_hosts:
                self._add_host(entry, profile)
            for domain in item.sender_domains:
                self.sender_domains[domain] = profile
        self._prefixes = {
            version: sorted((p for v, p in self._networks if v == version), reverse=True)
            for version in (4, 6)
        }

    def _add_host(self, entry: str, profile: Profile) -> None:
        network = client_network(entry)
        if network is None:
            self.host_names[entry.lower()] = profile
            return
        table = self._networks.setdefault((network.version, network.prefixlen), {})
        table[int(network.network_address)] = (profile, entry)

    @property
    def uses_host_names(self) -> bool:
        """Only then is a reverse DNS lookup worth making for each client."""
        return bool(self.host_names)

    def by_address(self, address: IpAddress) -> ProfileMatch | None:
        bits = address.max_prefixlen
        value = int(address)
        for prefix in self._prefixes[address.version]:
            masked = value >> (bits - prefix) << (bits - prefix) if prefix else 0
            hit = self._networks[(address.version, prefix)].get(masked)
            if hit is not None:
                return ProfileMatch(hit[0], "client-ip", hit[1])
        return None


def match_profile(
    index: ProfileIndex, client_ip: str, confirmed_names: Sequence[str] = ()
) -> ProfileMatch:
    """The profile for a client: by IP, then by confirmed host name, else the default."""
    try:
        found = index.by_address(client_address(client_ip))
    except ValueError:
        found = None
    if found is not None:
        return found
    for name in sorted(n.lower().rstrip(".") for n in confirmed_names):
        profile = index.host_names.get(name)
        if profile is not None:
            return ProfileMatch(profile, "host-name", name)
    return ProfileMatch(index.default, "default")


def match_sender_domain(index: ProfileIndex, sender_domain: str) -> ProfileMatch | None:
    """The profile a sender domain selects (for the inbound TLS requirement only)."""
    profile = index.sender_domains.get(sender_domain.lower())
    return ProfileMatch(profile, "sender-domain", sender_domain) if profile else None
