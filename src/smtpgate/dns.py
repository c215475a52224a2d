"""The gateway's one DNS resolver, behind an interface tests can point anywhere.

Reverse DNS for connection profiles now (forward-confirmed host names), MX,
A and AAAA for direct delivery later. ``gateway.dns`` picks the name servers
(a DNS server on 127.0.0.1 in tests); empty means the system's resolv.conf.
Lookups that fail or time out return nothing: a missing name never matches.

Queries carry the AD flag (RFC 6840 §5.7), so a validating resolver says which
answers it validated; ``secure`` answers (MX, TLSA) are those it marked
authentic. The bit is only as trustworthy as the path to the resolver: DANE
(``outbound_security.dane``) needs a local validating resolver, as in Postfix.
"""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass
from typing import Literal, Protocol

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.resolver
import dns.reversename

from smtpgate.config.schema import DnsSettings

MAX_PTR_NAMES = 10  # Postfix, too, looks at a bounded number of PTR names


MxStatus = Literal["ok", "null", "nxdomain", "nodata", "temporary"]


@dataclass(frozen=True)
class MxAnswer:
    """MX hosts by preference, or why there are none (RFC 5321 §5.1, RFC 7505)."""

    hosts: list[tuple[int, str]]
    status: MxStatus
    secure: bool = False  # the resolver validated the answer (DNSSEC, AD bit)


@dataclass(frozen=True)
class Records:
    """Records of one type as text, whether the resolver validated them, and the
    lookup's status (``temporary``: no answer to rely on either way)."""

    values: list[str]
    status: Literal["ok", "nxdomain", "nodata", "temporary"]
    secure: bool = False


class Resolver(Protocol):
    async def ptr(self, ip: str) -> list[str]: ...

    async def addresses(self, name: str) -> list[str]: ...

    async def mx(self, domain: str) -> MxAnswer: ...

    async def records(self, name: str, rdtype: str) -> Records: ...


class DnsResolver:
    """dnspython's asynchronous resolver with our settings."""

    def __init__(self, settings: DnsSettings) -> None:
        self._resolver = dns.asyncresolver.Resolver(configure=not settings.nameservers)
        if settings.nameservers:
            self._resolver.nameservers = list(settings.nameservers)
            self._resolver.port = settings.port
        self._resolver.lifetime = settings.timeout
        self._resolver.flags = dns.flags.RD | dns.flags.AD  # ask for the AD bit

    async def _query(self, name: str, rdtype: str) -> list[str]:
        try:
            answer = await self._resolver.resolve(name, rdtype)
        except (dns.exception.DNSException, OSError):
            return []
        return [item.to_text() for item in answer]

    async def ptr(self, ip: str) -> list[str]:
        names = await self._query(dns.reversename.from_address(ip).to_text(), "PTR")
        return [n.rstrip(".").lower() for n in names[:MAX_PTR_NAMES]]

    async def addresses(self, name: str) -> list[str]:
        found = await asyncio.gather(self._query(name, "A"), self._query(name, "AAAA"))
        return [address for group in found for address in group]

    async def mx(self, domain: str) -> MxAnswer:
        try:
            answer = await self._resolver.resolve(domain, "MX")
        except dns.resolver.NXDOMAIN:
            return MxAnswer([], "nxdomain")
        except dns.resolver.NoAnswer:
            return MxAnswer([], "nodata")
        except (dns.exception.DNSException, OSError):
            return MxAnswer([], "temporary")
        secure = bool(answer.response.flags & dns.flags.AD)
        hosts = sorted(
            (int(r.preference), r.exchange.to_text().rstrip(".").lower()) for r in answer
        )
        if len(hosts) == 1 and hosts[0][1] in ("", "."):
            return MxAnswer([], "null")  # RFC 7505: the domain accepts no mail
        return MxAnswer([h for h in hosts if h[1]], "ok", secure)

    async def records(self, name: str, rdtype: str) -> Records:
        """TXT (strings joined, RFC 7208 style), TLSA and other records as text."""
        try:
            answer = await self._resolver.resolve(name, rdtype)
        except dns.resolver.NXDOMAIN:
            return Records([], "nxdomain")
        except dns.resolver.NoAnswer:
            return Records([], "nodata")
        except (dns.exception.DNSException, OSError):
            return Records([], "temporary")
        secure = bool(answer.response.flags & dns.flags.AD)
        if rdtype == "TXT":
            texts = [b"".join(r.strings).decode("utf-8", "replace") for r in answer]
            return Records(texts, "ok", secure)
        return Records([r.to_text() for r in answer], "ok", secure)


async def confirmed_names(resolver: Resolver, ip: str) -> list[str]:
    """Names from reverse DNS whose own addresses include ``ip`` (FCrDNS)."""
    try:
        client = ipaddress.ip_address(ip)
    except ValueError:
        return []
    names = await resolver.ptr(ip)
    checks = await asyncio.gather(*(resolver.addresses(name) for name in names))
    confirmed = []
    for name, addresses in zip(names, checks, strict=True):
        if any(_same(client, a) for a in addresses):
            confirmed.append(name)
    return confirmed


def _same(client: ipaddress.IPv4Address | ipaddress.IPv6Address, text: str) -> bool:
    try:
        return ipaddress.ip_address(text) == client
    except ValueError:
        return False
