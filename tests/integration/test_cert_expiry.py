"""Certificate expiry notices: a running gateway with a certificate that ends in
40 days, its expiry check on a clock the test moves: one mail to
``gateway.admin_address`` at 30, 14 and 3 days before, each once, remembered
across a restart (data_dir/cert-expiry.json, 0600)."""

from __future__ import annotations

import asyncio
import datetime as dt
import email
import email.policy
import stat
import time
from pathlib import Path

from smtpgate.tls.certificates import self_signed
from smtpgate.tls.expiry import DAY, ExpiryNotices, Notice, due
from tests.clock import FakeClock
from tests.conftest import GatewayFactory, SinkHandle


def _certificate(directory: Path, days: int) -> dict[str, str]:
    cert_pem, key_pem = self_signed("mx.gw.test", days)
    cert, key = directory / "mx.pem", directory / "mx.key"
    cert.write_bytes(cert_pem)
    key.write_bytes(key_pem)
    key.chmod(0o600)
    return {"name": "mx", "cert": str(cert), "key": str(key)}


async def _wake_and_settle(expiry: ExpiryNotices) -> None:
    expiry.wake.set()
    await asyncio.sleep(0.5)  # the check runs; a notice is queued and delivered at once


async def test_notices_at_30_14_and_3_days_each_once(
    gateway_factory: GatewayFactory, sink: SinkHandle, tmp_path: Path
) -> None:
    clock = FakeClock(time.time())
    gw = await gateway_factory(certificates=[_certificate(tmp_path, 40)])
    [(_, leaf)] = gw.gateway.expiry.leaves() if gw.gateway.expiry else []
    ends = leaf.not_valid_after_utc.timestamp()
    expiry = gw.gateway.expiry
    assert expiry is not None
    expiry.clock = clock.now
    await _wake_and_settle(expiry)
    assert sink.messages() == []  # 40 days left: nothing yet

    subjects = []
    for days_left, threshold, count in ((29, 30, 1), (13, 14, 2), (2, 3, 3)):
        clock.time = ends - days_left * DAY + 60  # a minute under days_left days
        expiry.wake.set()
        received = await sink.wait_for(count)
        assert len(received) == count
        meta, raw = received[-1]
        assert meta["recipients"] == ["postmaster@example.com"]
        assert meta["sender"] == ""  # the null sender: nothing bounces back to it
        message = email.message_from_bytes(raw, policy=email.policy.default)
        subjects.append(str(message["Subject"]))
        text = message.get_body().get_content()  # type: ignore[union-attr]
        assert f"expires within {threshold} days" in text
        assert "subject:   CN=mx.gw.test" in text
        await _wake_and_settle(expiry)  # checked again the same day: no second mail
        assert len(sink.messages()) == count
    assert subjects[0].startswith("Certificate mx on gw.test expires in 28 days")
    assert "expires in 12 days" in subjects[1]
    assert "expires in 1 days" in subjects[2]

    state = gw.gateway.started.gateway.data_dir / "cert-expiry.json"
    assert stat.S_IMODE(state.stat().st_mode) == 0o600

    async def must_not_send(notice: Notice, now: dt.datetime) -> bool:
        raise AssertionError(f"sent again after a restart: {notice}")

    restarted = ExpiryNotices(state, expiry.leaves, must_not_send, clock.now)
    assert await restarted.check() == []


def test_a_certificate_first_seen_late_gets_one_notice() -> None:
    now = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    assert due(now + dt.timedelta(days=40), now, set()) == (None, set())
    assert due(now + dt.timedelta(days=20), now, set()) == (30, {30})
    assert due(now + dt.timedelta(days=2), now, set()) == (3, {30, 14, 3})  # the nearest only
    assert due(now + dt.timedelta(days=2), now, {30, 14, 3}) == (None, {30, 14, 3})
    assert due(now - dt.timedelta(days=1), now, {30}) == (3, {30, 14, 3})  # expired meanwhile


async def test_checked_at_start(
    gateway_factory: GatewayFactory, sink: SinkHandle, tmp_path: Path
) -> None:
    await gateway_factory(certificates=[_certificate(tmp_path, 20)])
    [(meta, raw)] = await sink.wait_for(1)
    assert meta["recipients"] == ["postmaster@example.com"]
    assert b"expires within 30 days" in raw
