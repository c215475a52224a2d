"""Where a send connector delivers: the hosts to try, in order, resolved with the
gateway's one resolver (``gateway.dns``).

* A smarthost given by name is resolved like an MX host, to its A and AAAA
  addresses, never with the system resolver behind ``getaddrinfo``: the same
  name servers, timeout and view for every next hop (and for ``connector
  verify``). An address literal is used as it is, and ``localhost`` is the
  loopback addresses.
* Direct delivery: the MX hosts of the recipient domain in preference order,
  or the domain's own A/AAAA when it has no MX (RFC 5321 §5.1). A null MX
  (RFC 7505) and a domain that does not exist fail permanently; a DNS failure
  is temporary.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
from dataclasses import dataclass

from smtpgate.config.schema import DeliverBy
from smtpgate.dns import Resolver


@dataclass(frozen=True)
class Target:
    host: str  # the name the certificate is checked against and logs show
    address: str
    port: int
    secure: bool = False  # from an MX answer the resolver validated (DNSSEC): DANE applies


@dataclass(frozen=True)
class NoTarget:
    """Why there is nowhere to connect: a reply for every recipient."""

    code: int | None  # None: temporary, no server reached
    text: str

    @property
    def reached(self) -> bool:
        """A permanent answer from DNS is final, as a server's would be."""
        return self.code is not None


@functools.lru_cache(maxsize=1024)
def _literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


LOOPBACK = ("127.0.0.1", "::1")  # RFC 6761 §6.3: "localhost" is never looked up


async def _addresses(resolver: Resolver, host: str, port: int) -> list[Target]:
    if _literal(host):
        return [Target(host, host, port)]
    if host.lower().rstrip(".") == "localhost":
        return [Target(host, address, port) for address in LOOPBACK]
    return [Target(host, address, port) for address in await resolver.addresses(host)]


async def resolve_targets(
    resolver: Resolver, deliver: DeliverBy, domain: str
) -> list[Target] | NoTarget:
    """The targets for ``domain`` through a connector's ``deliver`` settings."""
    if deliver.smarthost is not None:
        smarthost = deliver.smarthost
        found = await _addresses(resolver, smarthost.host, smarthost.port)
        return found or NoTarget(None, f"4.4.3 cannot resolve the smarthost {smarthost.host}")
    assert deliver.dns is not None
    answer = await resolver.mx(domain)
    if answer.status == "null":
        return NoTarget(556, "5.1.10 the domain accepts no mail (null MX)")
    if answer.status == "nxdomain":
        return NoTarget(550, "5.1.2 the recipient domain does not exist")
    if answer.status == "temporary":
        return NoTarget(None, "4.4.3 DNS lookup of the MX failed")
    targets = []
    for host in [name for _, name in answer.hosts] or [domain]:
        targets += await _addresses(resolver, host, deliver.dns.port)
    if answer.secure and answer.hosts:
        targets = [dataclasses.replace(t, secure=True) for t in targets]
    if not targets and answer.status == "nodata":
        return NoTarget(550, "5.1.2 the recipient domain has no mail host")
    return targets or NoTarget(None, f"4.4.3 no address for the mail hosts of {domain}")
