"""TLS reports (RFC 8460) to ``mailto:`` addresses go through the queue.

``delivery/tlsrpt.py`` builds the message; this hands it to the queue like a
DSN: the null sender (a report is never answered with a bounce) and the kind
``ADMIN_REPORT``, which is dropped, not reported, when it cannot be delivered.
"""

from __future__ import annotations

from smtpgate.delivery.tlsrpt import Submit
from smtpgate.model.envelope import Envelope, Recipient
from smtpgate.queue.queue import Queue
from smtpgate.queue.states import MessageKind
from smtpgate.spool import SpooledBody, new_queue_id


def tls_report_submitter(queue: Queue) -> Submit:
    """The ``submit`` callback of ``send_reports`` for this queue."""

    async def submit(recipient: str, message: bytes) -> str:
        body = SpooledBody(queue.directory, new_queue_id())
        body.write(message)
        body.finish()
        envelope = Envelope(sender="", recipients=(Recipient(recipient),))
        return await queue.ingest(envelope, body, MessageKind.ADMIN_REPORT)

    return submit
