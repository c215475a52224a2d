"""Drive the sans-IO core with bytes and a scripted application."""

from __future__ import annotations

from smtpgate.proto import events as ev
from smtpgate.proto import replies as r
from smtpgate.proto.replies import Reply
from smtpgate.proto.server import ServerConnection
from smtpgate.proto.state import SessionLimits


class Driver:
    """Answers every event as a permissive server would, recording what happened."""

    def __init__(
        self,
        limits: SessionLimits | None = None,
        *,
        starttls: bool = False,
        auth: tuple[str, ...] = (),
    ) -> None:
        self.conn = ServerConnection(limits)
        self.starttls = starttls
        self.auth = auth
        self.events: list[ev.Event] = []
        self.body = bytearray()
        self.bodies: list[bytes] = []
        self.overrides: dict[type, Reply] = {}
        self.conn.greet(Reply.of(220, None, "test ESMTP"))
        self.conn.data_to_send()

    def feed(self, data: bytes) -> str:
        """Send client bytes; return what the server wrote, decoded."""
        self.conn.receive_data(data)
        while True:
            event = self.conn.next_event()
            if isinstance(event, ev.NeedData):
                break
            self.events.append(event)
            if isinstance(event, ev.MessageData):
                self.body += event.data
                continue
            if isinstance(event, (ev.MessageRejected, ev.AuthAborted)):
                self.body.clear()
                continue
            if isinstance(event, ev.MessageComplete):
                self.bodies.append(bytes(self.body))
                self.body.clear()
            self.conn.reply(self.answer(event))
        return self.conn.data_to_send().decode("utf-8", "replace")

    def answer(self, event: ev.Event) -> Reply:
        if type(event) in self.overrides:
            return self.overrides[type(event)]
        if isinstance(event, ev.Hello):
            return self.conn.ehlo_reply("test", starttls=self.starttls, auth=self.auth)
        if isinstance(event, ev.DataRequested):
            return r.START_INPUT
        if isinstance(event, ev.Quit):
            return r.BYE
        if isinstance(event, ev.StartTls):
            return r.READY_FOR_TLS
        if isinstance(event, ev.AuthRequested):
            return Reply.of(334, None, "")
        if isinstance(event, ev.AuthResponse):
            return Reply.of(235, "2.7.0", "Authentication successful")
        return r.OK

    def transaction(self) -> str:
        """EHLO, MAIL and one RCPT, answered; returns nothing of interest."""
        out = self.feed(b"EHLO c.example\r\n")
        return out + self.feed(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n")


def codes(output: str) -> list[str]:
    """Each reply's code and enhanced status ('250 2.0.0', or '354'), in order."""
    found = []
    for line in output.splitlines():
        if line[3:4] != " ":
            continue
        status = line[4:].split(" ", 1)[0]
        has_status = len(status) >= 5 and status[0].isdigit() and status[1] == "."
        found.append(f"{line[:3]} {status}" if has_status else line[:3])
    return found
