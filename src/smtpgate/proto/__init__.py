"""Sans-IO SMTP: bytes in, events out; replies in, bytes out.

Nothing in this package performs I/O, reads the clock or imports asyncio.
The public surface is :class:`ServerConnection`, the event classes, and
:class:`Reply`.
"""

from smtpgate.proto.events import (
    AuthAborted,
    AuthRequested,
    AuthResponse,
    DataRequested,
    Event,
    Hello,
    Help,
    MailFrom,
    MessageComplete,
    MessageData,
    MessageRejected,
    NeedData,
    Noop,
    Quit,
    RcptTo,
    Reset,
    StartTls,
    Verify,
)
from smtpgate.proto.replies import Reply
from smtpgate.proto.server import ServerConnection
from smtpgate.proto.state import SessionLimits, State

__all__ = [
    "AuthAborted",
    "AuthRequested",
    "AuthResponse",
    "DataRequested",
    "Event",
    "Hello",
    "Help",
    "MailFrom",
    "MessageComplete",
    "MessageData",
    "MessageRejected",
    "NeedData",
    "Noop",
    "Quit",
    "RcptTo",
    "Reply",
    "Reset",
    "ServerConnection",
    "SessionLimits",
    "StartTls",
    "State",
    "Verify",
]
