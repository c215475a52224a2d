"""TLS reports (RFC 8460) as administrative operations: ``smtpgate tlsrpt``.

* ``send_day``: the reports of one day from this node's ``data_dir/tlsrpt.db``
  (which the running gateway fills), ``mailto:`` ones put straight into the
  queue store (as *Send credentials* does; the running gateway's queue
  manager picks them up), ``https:`` ones posted. A domain's day is sent
  once, whether by the gateway's daily run or by hand.
* ``summary``: a TLS report someone sent to a hosted domain (JSON, gzip'ed
  JSON or the whole message), read into a readable summary.
"""

from __future__ import annotations

from typing import Any

from smtpgate.config.schema import GatewayConfig
from smtpgate.delivery.tlsrpt import SessionRecorder, Submit, load_report, send_reports, summarize
from smtpgate.dns import DnsResolver
from smtpgate.model.envelope import Envelope, Recipient
from smtpgate.queue.states import MessageKind
from smtpgate.queue.store import NewMessage, QueueStore
from smtpgate.spool import SpooledBody, new_queue_id


def store_submitter(config: GatewayConfig) -> Submit:
    """Queue a report message in the data directory's queue store."""

    async def submit(recipient: str, message: bytes) -> str:
        store = QueueStore(config.gateway.data_dir / "queue")
        try:
            body = SpooledBody(store.bodies, new_queue_id())
            body.write(message)
            body.finish()
            envelope = Envelope(sender="", recipients=(Recipient(recipient),))
            store.ingest([NewMessage(envelope, body, MessageKind.ADMIN_REPORT)])
        finally:
            store.close()
        return body.queue_id

    return submit


async def send_day(config: GatewayConfig, day: str) -> list[str]:
    """Send ``day``'s reports not yet sent; one line per ``rua``."""
    recorder = SessionRecorder(config.gateway.data_dir / "tlsrpt.db")
    settings = config.outbound_security.tlsrpt
    hostname = config.gateway.hostname
    try:
        return await send_reports(
            recorder,
            DnsResolver(config.gateway.dns),
            day,
            organization=settings.organization,
            contact=settings.contact,
            submitter=hostname,
            sender=config.gateway.admin_address or f"postmaster@{hostname}",
            submit=store_submitter(config),
            ca_files=tuple(str(p) for p in config.tls.ca_files),
        )
    finally:
        recorder.close()


def summary(data: bytes) -> dict[str, Any]:
    """A received report and its readable lines (raises ValueError if it is none)."""
    report = load_report(data)
    return {"report": report, "summary": summarize(report)}
