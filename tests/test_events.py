"""The event hub, the mail log's text and the tracking store, without a gateway."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import structlog

from smtpgate.observe import events, log, maillog, tracking
from smtpgate.observe.events import Client, DeliveryAttempt, Hub, MessageAccepted, Refused
from smtpgate.observe.metrics import Metrics
from smtpgate.proto.replies import Reply


def test_a_failing_subscriber_is_logged_once_and_never_stops_the_others() -> None:
    hub, seen = Hub(), []

    def broken(event: events.Event) -> None:
        raise RuntimeError("bug")

    hub.subscribe(broken)
    remove = hub.subscribe(seen.append)
    event = events.DsnSent("Q2", "Q1", "failed", "a@example.org")
    with structlog.testing.capture_logs() as logged:
        hub.publish(event)
        hub.publish(event)
    assert seen == [event, event]
    assert [e["event"] for e in logged] == ["event subscriber failed"]
    remove()
    hub.publish(event)
    assert len(seen) == 2


def test_message_id_is_read_from_the_header_section_only() -> None:
    head = b"Subject: x\r\nMessage-ID:\r\n <a.b@example.org>\r\nTo: y\r\n\r\nMessage-ID: <no>\r\n"
    assert events.message_id(head) == "<a.b@example.org>"
    assert events.message_id(b"Subject: x\r\n\r\nMessage-ID: <body@x>\r\n") == ""


def test_a_client_cannot_forge_a_second_log_line() -> None:
    client = Client("192.0.2.1", helo="evil\r\n2026-01-01T00:00:00Z Q: to=<x>")
    line = maillog.refused_line(
        Refused("RCPT", client, 554, "5.7.1", "554 5.7.1 no", "relay", "a@b", "c@d")
    )
    assert "\n" not in line
    assert "\r" not in line


def test_the_tracking_store_keeps_records_and_expires_them(tmp_path: Path) -> None:
    writer = tracking.TrackingWriter(tmp_path, lambda: 7)
    writer.start()
    old = time.time() - 8 * tracking.DAY
    client = Client("192.0.2.1", listener="mx", profile="default")
    writer(MessageAccepted("Q1", client, "a@x.test", ("b@example.com",), 10, "<m@x>", (), old))
    writer(MessageAccepted("Q2", client, "a@x.test", ("c@example.com",), 10, "<n@x>"))
    writer(
        DeliveryAttempt(
            "Q2", "c@example.com", "out", "mx[192.0.2.9]:25", 1.0, (0.5, 0, 0.2, 0.3),
            "2.0.0", "sent", "250 ok",
        )
    )  # fmt: skip
    writer.stop()
    [record] = tracking.search(tmp_path, tracking.Query(message_id="n@x"))
    assert (record["queue_id"], record["status"]) == ("Q2", "sent")
    assert tracking.search(tmp_path, tracking.Query(sender="A@X.TEST", limit=10))[0]["queue_id"]
    assert tracking.search(tmp_path, tracking.Query(queue_id="Q1")) == []  # expired at start
    assert (tmp_path / "tracking.db").stat().st_mode & 0o077 == 0


def test_a_batch_larger_than_one_statement_is_stored_whole(tmp_path: Path) -> None:
    """The writer stores many events per statement: every one of a burst
    (more than one statement's worth) is found, with its own values."""
    writer = tracking.TrackingWriter(tmp_path, lambda: 7)
    client = Client("192.0.2.1", listener="mx", profile="default")
    for n in range(137):  # queued before the thread starts: one batch
        writer(MessageAccepted(f"Q{n}", client, f"s{n}@x.test", (f"r{n}@example.com",), n, ""))
    writer.start()
    writer.stop()
    found = tracking.search(tmp_path, tracking.Query(limit=1000))
    assert sorted(r["queue_id"] for r in found) == sorted(f"Q{n}" for n in range(137))
    [one] = tracking.search(tmp_path, tracking.Query(recipient="r99@example.com"))
    assert one["queue_id"] == "Q99"


def test_metrics_count_events_and_replies_by_the_next_sample() -> None:
    """Counts are tallied on the hot path and reach the exposition at the next
    sample (which comes before every write of it), each under its labels."""
    metrics = Metrics()
    client = Client("192.0.2.1", listener="mx", profile="default")
    for _ in range(3):
        metrics(events.Connected(client))
    metrics(MessageAccepted("Q1", client, "a@x.test", ("b@example.com",), 1234, ""))
    metrics.count_reply(Reply.of(250, "2.1.0", "ok"))
    metrics.count_reply(Reply.of(550, "5.7.1", "no"))
    metrics.sample({})
    text = metrics.exposition().decode()
    assert 'smtpgate_connections_total{listener="mx",profile="default"} 3.0' in text
    assert 'smtpgate_messages_accepted_total{listener="mx",profile="default"} 1.0' in text
    assert "smtpgate_messages_accepted_bytes_total 1234.0" in text
    assert 'smtpgate_smtp_replies_total{code_class="5xx",enhanced="5.7.1"} 1.0' in text
    metrics(events.Connected(client))
    metrics.sample({})
    assert 'profile="default"} 4.0' in metrics.exposition().decode()


def test_syslog_target_sends_each_line_as_a_datagram(tmp_path: Path) -> None:
    path = tmp_path / "log.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        server.settimeout(5)
        try:
            log.configure("info")
            log.set_target("syslog", str(path))
            log.get_logger("test").warning("a line for syslog", n=1)
            data = server.recv(4096).decode()
        finally:
            log.set_target("stderr")
            structlog.reset_defaults()  # as the other tests found it
    assert data.startswith("<22>smtpgate: ")  # facility mail (2 * 8), severity info (6)
    assert "a line for syslog" in data


@pytest.mark.parametrize(
    ("text", "ago"), [("90s", 90), ("30m", 1800), ("2h", 7200), ("7d", 7 * 86400)]
)
def test_ages_are_times_ago(text: str, ago: float) -> None:
    assert tracking.parse_when(text, now=1000000.0) == 1000000.0 - ago


def test_iso_times_are_utc() -> None:
    assert tracking.parse_when("2026-01-01T00:00:00Z") == tracking.parse_when("2026-01-01")
    with pytest.raises(ValueError, match="Invalid"):
        tracking.parse_when("yesterday")


def test_a_flood_of_refused_connections_is_not_stored_whole() -> None:
    client = Client("192.0.2.7", listener="mx", profile="blocked")
    first = Refused("CONNECT", client, 554, "5.7.1", "554 5.7.1 no", "blocked")
    again = Refused("CONNECT", client, 554, "5.7.1", "554 5.7.1 no", "blocked", first=False)
    assert tracking.row(first) is not None
    assert tracking.row(again) is None
