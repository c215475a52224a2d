"""``smtpgate sink``: a recording SMTP server for operators and tests.

It accepts every recipient and writes each message to a folder as two files:
``<id>.eml`` (the body as received, with our Received header) and
``<id>.json`` (the envelope). Files appear atomically (written, fsynced,
renamed), so a reader never sees half a message. Scripted refusals
(``--rcpt-reply``, ``--data-reply``) let tests play a difficult next hop.
It runs on the same protocol core and session code as the gateway.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from smtpgate.inbound.contract import SessionHandler, SessionInfo, SessionSettings
from smtpgate.inbound.server import InboundServer, ListenerSpec, ServerLimits, until_stop_signal
from smtpgate.model.envelope import Envelope
from smtpgate.proto import events as ev
from smtpgate.proto.replies import Reply
from smtpgate.proto.state import SessionLimits
from smtpgate.spool import SpooledBody, fsync_path


def parse_reply(text: str) -> Reply:
    """``"451 4.3.0 try later"`` → a Reply (for scripted refusals)."""
    code, _, rest = text.partition(" ")
    status, _, words = rest.partition(" ")
    return Reply.of(int(code), status, words or "scripted reply")


@dataclass
class SinkBehaviour:
    directory: Path
    fsync: bool = True
    rcpt_reply: Reply | None = None
    refuse: dict[str, Reply] = field(default_factory=dict)  # recipient → reply
    data_replies: list[Reply] = field(default_factory=list)  # used in turn, then 250


class SinkHandler:
    def __init__(self, behaviour: SinkBehaviour) -> None:
        self.behaviour = behaviour

    def on_connect(self, info: SessionInfo) -> Reply | None:
        return None

    def on_command(self, info: SessionInfo, event: ev.Event) -> Reply | None:
        if isinstance(event, ev.RcptTo):
            return self.behaviour.refuse.get(event.recipient.lower(), self.behaviour.rcpt_reply)
        return None

    async def on_message(self, info: SessionInfo, envelope: Envelope, body: SpooledBody) -> Reply:
        if self.behaviour.data_replies:
            return self.behaviour.data_replies.pop(0)
        queue_id = body.queue_id
        await asyncio.to_thread(self._store, envelope, body, queue_id)
        return Reply.of(250, "2.0.0", f"Ok: stored as {queue_id}")

    async def on_auth(self, info: SessionInfo, username: str, password: str) -> Reply:
        return Reply.of(535, "5.7.8", "The sink accepts no credentials")

    def _store(self, envelope: Envelope, body: SpooledBody, queue_id: str) -> None:
        directory = self.behaviour.directory
        meta = {
            "sender": envelope.sender,
            "recipients": [r.address for r in envelope.recipients],
            "client_ip": envelope.client_ip,
            "helo": envelope.helo,
            "tls": envelope.tls,
            "size": body.size,
            "dsn": {
                "ret": envelope.mail_params.ret,
                "envid": envelope.mail_params.envid,
                "recipients": [
                    {
                        "notify": sorted(r.params.notify) if r.params.notify is not None else None,
                        "orcpt": list(r.params.orcpt) if r.params.orcpt else None,
                    }
                    for r in envelope.recipients
                ],
            },
        }
        meta_tmp = directory / f".{queue_id}.json.tmp"
        meta_tmp.write_text(json.dumps(meta, indent=1))
        body.save_as(directory / f"{queue_id}.eml", fsync=self.behaviour.fsync)
        if self.behaviour.fsync:
            fsync_path(meta_tmp)
        os.replace(meta_tmp, directory / f"{queue_id}.json")
        if self.behaviour.fsync:
            fsync_path(directory)


def build_sink(
    host: str, port: int, behaviour: SinkBehaviour, limits: SessionLimits | None = None
) -> InboundServer:
    behaviour.directory.mkdir(parents=True, exist_ok=True)
    spool = behaviour.directory / ".spool"
    spool.mkdir(exist_ok=True)
    settings = SessionSettings(
        limits=limits or SessionLimits(max_message_size=200_000_000),
        command_timeout=300,
        data_timeout=180,
        tls_handshake_timeout=60,
        spool_dir=spool,
        tls_context=None,
        require_tls=False,
    )
    spec = ListenerSpec("sink", host, port, None, settings)
    server_limits = ServerLimits(10_000, 10_000, 60)

    def handler_factory() -> SessionHandler:
        return SinkHandler(behaviour)

    return InboundServer([spec], handler_factory, server_limits, "sink.invalid")


async def run_sink(host: str, port: int, behaviour: SinkBehaviour) -> None:
    """Run the sink until SIGTERM/SIGINT; say where it listens once it does."""
    server = build_sink(host, port, behaviour)
    await server.start()
    bound = server.bound_ports()["sink"]
    print(f"sink listening on {host}:{bound}, writing to {behaviour.directory}", flush=True)
    await until_stop_signal()
    await server.stop(5)
