"""Apply under traffic: while clients send continuously, a profile goes from
``full`` to ``blocked``. New connections follow the new revision, a session
that was already open finishes on the snapshot it started with, no accepted
message is lost and no connection is reset. Against a real ``smtpgate serve``
process (uvloop) and a real sink."""

from __future__ import annotations

import asyncio
import smtplib
import threading
import time
from dataclasses import dataclass, field

from tests.conftest import SinkHandle
from tests.integration.conftest import PROFILE, Api

CLIENTS = 4


@dataclass
class Traffic:
    stop: threading.Event = field(default_factory=threading.Event)
    accepted: list[str] = field(default_factory=list)  # message ids the gateway took
    blocked: list[float] = field(default_factory=list)  # connect times refused at greeting
    accepted_at: list[float] = field(default_factory=list)  # connect times of accepted
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def message(self, tag: str) -> tuple[str, bytes]:
        mid = f"<{tag}.{time.monotonic_ns()}@apps.test>"
        return mid, f"Message-ID: {mid}\r\nSubject: load\r\n\r\nhello\r\n".encode()


def one_per_connection(port: int, traffic: Traffic, worker: int) -> None:
    while not traffic.stop.is_set():
        started = time.monotonic()
        mid, body = traffic.message(f"w{worker}")
        try:
            with smtplib.SMTP("127.0.0.1", port, source_address=("127.0.0.2", 0), timeout=10) as s:
                s.sendmail("app@apps.test", ["user@elsewhere.test"], body)
        except smtplib.SMTPConnectError as exc:
            with traffic.lock:
                if exc.smtp_code == 554:
                    traffic.blocked.append(started)
                else:
                    traffic.errors.append(f"greeting {exc.smtp_code}")
            continue
        except (OSError, smtplib.SMTPException) as exc:
            with traffic.lock:
                traffic.errors.append(repr(exc))
            continue
        with traffic.lock:
            traffic.accepted.append(mid)
            traffic.accepted_at.append(started)


def long_session(port: int, traffic: Traffic, applied: threading.Event) -> int:
    """One connection opened before the apply that keeps sending after it."""
    after = 0
    with smtplib.SMTP("127.0.0.1", port, source_address=("127.0.0.2", 0), timeout=10) as s:
        while not traffic.stop.is_set():
            mid, body = traffic.message("long")
            s.sendmail("app@apps.test", ["user@elsewhere.test"], body)
            with traffic.lock:
                traffic.accepted.append(mid)
            after += applied.is_set()
            time.sleep(0.02)
    return after


async def test_full_to_blocked_under_traffic(api: Api, sink: SinkHandle) -> None:
    port = api.gateway.port
    traffic = Traffic()
    applied = threading.Event()
    workers = [asyncio.to_thread(one_per_connection, port, traffic, n) for n in range(CLIENTS)]
    long_task = asyncio.ensure_future(asyncio.to_thread(long_session, port, traffic, applied))
    tasks = [asyncio.ensure_future(w) for w in workers]
    await asyncio.sleep(1.5)
    before = len(traffic.accepted)

    await api.ok(
        "PUT", "/config/draft/connection_profiles/partner", json={**PROFILE, "relay": "blocked"}
    )
    await api.ok("POST", "/config/apply", json={"comment": "block the partner"})
    status = await api.wait_running(2)
    swapped_seen = time.monotonic()
    applied.set()
    assert status["running_revision"] == 2
    await asyncio.sleep(1.5)
    traffic.stop.set()
    await asyncio.gather(*tasks)
    kept_sending = await long_task

    print(
        f"accepted {len(traffic.accepted)} (before apply {before}), blocked "
        f"{len(traffic.blocked)}, long session after apply {kept_sending}"
    )
    assert traffic.errors == []  # no reset, no unexpected reply
    assert before > 0
    assert traffic.blocked, "new connections should be refused after the apply"
    late = [t for t in traffic.accepted_at if t > swapped_seen]
    assert late == []  # no connection opened after the swap was accepted
    assert kept_sending > 0  # the open session finished on its own snapshot
    arrived = await sink.wait_for(len(traffic.accepted), timeout=60)
    ids = {
        line
        for _, body in arrived
        for line in body.decode().splitlines()
        if line.startswith("Message-ID:")
    }
    assert {f"Message-ID: {mid}" for mid in traffic.accepted} <= ids  # none lost
    assert len(arrived) == len(traffic.accepted)  # and none twice
