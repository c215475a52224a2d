"""A small real SMTP server that is slow or crowded, for the shaping tests and benchmark.

It speaks enough SMTP for the gateway's client (EHLO, MAIL, RCPT, DATA, RSET,
NOOP, QUIT; no extensions but 8BITMIME), answers each end of data after
``data_delay`` seconds, and greets a connection beyond ``max_connections``
with ``421 4.7.0 Too many connections`` (what Postfix, Exchange and the large
providers say). It records what an operator would watch: connections at once
(the most it saw), connections refused, transactions per connection, and the
time each message arrived.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field


@dataclass
class SlowSink:
    data_delay: float = 0.0
    max_connections: int | None = None
    port: int = 0
    open_now: int = 0
    most_open: int = 0
    refused: int = 0
    per_connection: list[int] = field(default_factory=list)  # transactions, per closed conn.
    arrivals: list[float] = field(default_factory=list)  # monotonic time of each 250
    subjects: list[str] = field(default_factory=list)
    server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.max_connections is not None and self.open_now >= self.max_connections:
            self.refused += 1
            writer.write(b"421 4.7.0 Too many connections from your host\r\n")
            await writer.drain()
            writer.close()
            return
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        done = 0
        try:
            done = await self._talk(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open_now -= 1
            self.per_connection.append(done)
            writer.close()

    async def _talk(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
        writer.write(b"220 slow.test ESMTP\r\n")
        done = 0
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                writer.write(b"250-slow.test\r\n250 8BITMIME\r\n")
            elif verb == b"DATA":
                writer.write(b"354 go ahead\r\n")
                await writer.drain()
                subject = ""
                while (body := await reader.readline()) not in (b".\r\n", b""):
                    if body.lower().startswith(b"subject:"):
                        subject = body[8:].strip().decode("utf-8", "replace")
                await asyncio.sleep(self.data_delay)
                self.arrivals.append(time.monotonic())
                self.subjects.append(subject)
                done += 1
                writer.write(b"250 2.0.0 Ok\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 2.0.0 Bye\r\n")
                await writer.drain()
                break
            else:  # MAIL, RCPT, RSET, NOOP
                writer.write(b"250 2.0.0 Ok\r\n")
            await writer.drain()
        return done
