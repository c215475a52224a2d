"""A tiny authoritative DNS server on 127.0.0.1 for tests (dnspython, UDP).

Records are ``(name, type) -> [values]``; anything else is NXDOMAIN.

DNSSEC, for DANE tests: answers for names at or under one of ``secure`` carry
the AD bit, as a local validating resolver's would; the gateway trusts the AD
bit of its configured resolver (there are no signatures to check here).
"""

from __future__ import annotations

import asyncio
from typing import cast

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset


class DnsServer(asyncio.DatagramProtocol):
    def __init__(
        self, records: dict[tuple[str, str], list[str]], secure: tuple[str, ...] = ()
    ) -> None:
        self.secure = tuple(s.lower().rstrip(".") + "." for s in secure)
        self.records = {
            (name.lower().rstrip(".") + ".", kind): v for (name, kind), v in records.items()
        }
        self.transport: asyncio.DatagramTransport | None = None
        self.queries: list[tuple[str, str]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        query = dns.message.from_wire(data)
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        for question in query.question:
            name = question.name.to_text().lower()
            kind = dns.rdatatype.to_text(question.rdtype)
            self.queries.append((name, kind))
            values = self.records.get((name, kind))
            if any(name == s or name.endswith("." + s) for s in self.secure):
                response.flags |= dns.flags.AD
            if values:
                response.answer.append(dns.rrset.from_text(name, 60, "IN", kind, *values))
            elif not any(n == name for n, _ in self.records):
                response.set_rcode(dns.rcode.NXDOMAIN)
        assert self.transport is not None
        self.transport.sendto(response.to_wire(), addr)


async def start_dns(
    records: dict[tuple[str, str], list[str]], secure: tuple[str, ...] = ()
) -> tuple[DnsServer, int]:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: DnsServer(records, secure), local_addr=("127.0.0.1", 0)
    )
    return protocol, transport.get_extra_info("sockname")[1]
