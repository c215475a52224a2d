"""Properties of the protocol core, checked with Hypothesis.

* Any body made of dots, CR, LF and text either round-trips exactly through
  dot-stuffing and DATA, or is refused, and never yields two messages.
* Random command streams never raise anything but a protocol reply.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from smtpgate.proto import events as ev
from smtpgate.proto.client import stuff_dots
from smtpgate.proto.state import SessionLimits
from tests.proto.helpers import Driver, codes

body_pieces = st.lists(
    st.sampled_from([b".", b"\r", b"\n", b"\r\n", b"a", b"..", b"\r\n.", b"x y", b"\x00"]),
    max_size=40,
)


def _ready() -> Driver:
    d = Driver()
    d.transaction()
    d.feed(b"DATA\r\n")
    return d


@given(body_pieces, st.integers(min_value=1, max_value=7))
@settings(max_examples=400)
def test_any_body_round_trips_or_is_refused_never_split(pieces: list[bytes], cut: int) -> None:
    body = b"".join(pieces)
    d = _ready()
    wire = stuff_dots(body, True)
    if wire and not wire.endswith(b"\r\n"):
        wire += b"\r\n"
    stream = wire + b".\r\n"
    out = ""
    for i in range(0, len(stream), cut):  # arbitrary read boundaries
        out += d.feed(stream[i : i + cut])
    completes = [e for e in d.events if isinstance(e, ev.MessageComplete)]
    assert len(completes) <= 1
    clean = (
        b"\x00" not in body
        and body.replace(b"\r\n", b"").count(b"\r") == 0
        and (body.replace(b"\r\n", b"").count(b"\n") == 0)
    )
    if clean:
        expected = body if body.endswith(b"\r\n") or not body else body + b"\r\n"
        assert d.bodies == [expected]
        assert codes(out)[-1] == "250 2.0.0"
    else:
        assert d.bodies == []
        assert codes(out)[-1].startswith("550")


commands = st.lists(
    st.one_of(
        st.sampled_from(
            [
                b"EHLO x.example",
                b"HELO x",
                b"MAIL FROM:<a@b.example>",
                b"RCPT TO:<c@d.example>",
                b"DATA",
                b"BDAT 3",
                b"BDAT 2 LAST",
                b"RSET",
                b"NOOP",
                b"QUIT",
                b"STARTTLS",
                b"AUTH PLAIN",
                b"VRFY x",
                b".",
                b"",
                b"MAIL FROM:<>",
                b"RCPT TO:<>",
                b"*",
            ]
        ),
        st.binary(max_size=30),
    ),
    max_size=30,
)
line_ends = st.sampled_from([b"\r\n", b"\n", b"\r", b""])


@given(commands, st.lists(line_ends, min_size=30, max_size=30), st.integers(1, 50))
@settings(max_examples=400)
def test_random_command_streams_only_produce_replies(
    lines: list[bytes], ends: list[bytes], cut: int
) -> None:
    d = Driver(SessionLimits(max_errors=1000), starttls=True, auth=("PLAIN",))
    stream = b"".join(line + end for line, end in zip(lines, ends, strict=False))
    for i in range(0, len(stream), cut):
        if d.conn.closing:
            break
        d.feed(stream[i : i + cut])
        if d.conn.state.value == "tls-pending":
            d.conn.tls_started()
