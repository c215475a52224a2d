"""The POP3 client of the fetch connectors: connect, secure, log in, list, fetch, delete.

Built on the standard library's :mod:`poplib`, each blocking call run in a
worker thread (``asyncio.to_thread``) by the caller. Why not an asynchronous
client: a POP3 session is a short, strictly sequential conversation, one per
mailbox and poll, so a thread per session costs nothing measurable, while
``poplib`` is a maintained, reviewed implementation of the protocol's fiddly
parts (multi-line responses and dot-unstuffing, STLS, line length bounds of
2048 octets, APOP/USER/PASS) that an asyncio client would have to re-implement.

Rules kept here, as for outbound SMTP (``attempt.py``):

* ``implicit-tls``: TLS from the first byte (POP3S, port 995 by default);
  ``require-starttls``: STLS (RFC 2595) must be offered in CAPA and succeed,
  else the session ends before the user name is sent; ``starttls``: STLS
  when offered. ``none``: plaintext.
* The password is only ever sent over TLS, unless the connector's security is
  explicitly ``none`` (``config check`` warns): an opportunistic connector
  whose server offers no STLS stops before USER, like a demanded one.
* Certificates: with ``validate_certificate`` the chain (system store plus
  ``tls.ca_files``) and the host name (RFC 6125) are checked, with the
  gateway's TLS floor and cipher strength (``tls.protocols``,
  ``tls.cipher_strength``).
* Every message is LISTed first: one larger than ``limits.max_message_size``
  is never downloaded (it stays in the mailbox, logged).
* The password never appears in a log line or an error text.
"""

from __future__ import annotations

import contextlib
import poplib
import socket
import ssl
from dataclasses import dataclass, field

from smtpgate.config.schema import GatewayConfig, Pop3Connector, Pop3Mailbox
from smtpgate.config.secret import load_key, read_secret
from smtpgate.errors import DeliveryError
from smtpgate.tls.certificates import certificate_matches
from smtpgate.tls.context import client_context

TIMEOUT = 60.0  # seconds per POP3 command (socket timeout)
MAX_UIDL = 70  # RFC 1939 §7: a unique-id is 1 to 70 characters


class Pop3Error(DeliveryError):
    """A POP3 session failed; the text is safe to log (no secret in it). Always
    temporary for the fetcher: the mailbox is tried again at the next poll."""

    def __init__(self, message: str) -> None:
        super().__init__(message, permanent=False)


def mailbox_password(config: GatewayConfig, connector: Pop3Connector, box: Pop3Mailbox) -> str:
    """The clear password of a mailbox (encrypted with the cluster key, or a 0600 file)."""
    index = next(i for i, c in enumerate(config.receive_connectors.pop3) if c is connector)
    where = f"receive_connectors.pop3[{index}].mailboxes[{connector.mailboxes.index(box)}]"
    key = load_key(config.gateway.data_dir, create=False) if box.password is not None else None
    return read_secret(box.password, box.password_file, key, where).get_secret_value()


def tls_context(config: GatewayConfig, connector: Pop3Connector) -> ssl.SSLContext:
    return client_context(
        config.tls.protocols[0],
        config.tls.cipher_strength,
        validate=connector.validate_certificate,
        ca_files=[str(p) for p in config.tls.ca_files],
    )


@dataclass
class Pop3Session:
    """One open POP3 session (blocking; run its methods in a thread)."""

    client: poplib.POP3
    tls: str | None  # the TLS version, or None in plaintext
    steps: list[tuple[str, bool, str]] = field(default_factory=list)  # for verify

    @classmethod
    def open(cls, config: GatewayConfig, connector: Pop3Connector) -> Pop3Session:
        """Connect and secure the session as ``connector.security`` says."""
        session = cls.connect(config, connector)
        try:
            session.secure(config, connector)
        except BaseException:
            session.abandon()
            raise
        return session

    @classmethod
    def connect(cls, config: GatewayConfig, connector: Pop3Connector) -> Pop3Session:
        host, port = connector.host, connector.effective_port
        try:
            if connector.security == "implicit-tls":
                context = tls_context(config, connector)
                client: poplib.POP3 = poplib.POP3_SSL(host, port, context=context, timeout=TIMEOUT)
            else:
                client = poplib.POP3(host, port, timeout=TIMEOUT)
        except (OSError, poplib.error_proto) as exc:
            raise Pop3Error(f"cannot connect to {host}:{port}: {_why(exc)}") from None
        return cls(
            client, None, [("connect", True, f"{host}:{port}: {_text(client.getwelcome())}")]
        )

    def secure(self, config: GatewayConfig, connector: Pop3Connector) -> None:
        """STLS as the connector's security says; the certificate check; and the
        refusal to go on in plaintext unless the security is ``none``."""
        host = connector.host
        if connector.security in ("starttls", "require-starttls"):
            try:
                offered = "STLS" in self.client.capa()
            except (OSError, poplib.error_proto):
                offered = False  # no CAPA (RFC 2449): nothing is offered
            if offered:
                try:
                    self.client.stls(tls_context(config, connector))
                except (OSError, ssl.SSLError, poplib.error_proto) as exc:
                    raise Pop3Error(f"STLS with {host} failed: {_why(exc)}") from None
                self.steps.append(("stls", True, "TLS started"))
            elif connector.security == "require-starttls":
                self.steps.append(("stls", False, f"{host} does not offer STLS"))
                raise Pop3Error(f"{host} does not offer STLS, and the connector requires it")
        sock = self.client.sock
        if isinstance(sock, ssl.SSLSocket):
            self.tls = sock.version()
            if connector.validate_certificate:
                der = sock.getpeercert(binary_form=True)
                if der is None or not certificate_matches(der, [host]):
                    self.steps.append(("certificate", False, f"does not match {host}"))
                    raise Pop3Error(f"the certificate of {host} does not match {host}")
                self.steps.append(("certificate", True, f"valid for {host}"))
        if self.tls is None and connector.security != "none":
            self.steps.append(("login", False, "refusing to send the password without TLS"))
            raise Pop3Error(f"{host} offers no TLS: refusing to send the password in clear")

    def peer(self) -> str:
        """The server's IP address (the fetched mail's client address)."""
        try:
            return str(self.client.sock.getpeername()[0])
        except (OSError, IndexError):
            return "0.0.0.0"  # noqa: S104 - not a bind address: unknown peer

    def login(self, username: str, password: str) -> None:
        try:
            self.client.user(username)
            self.client.pass_(password)
        except poplib.error_proto as exc:
            self.steps.append(("login", False, _text(exc.args[0] if exc.args else b"")))
            raise Pop3Error(f"login as {username} failed: {_why(exc)}") from None
        except OSError as exc:
            raise Pop3Error(f"login as {username} failed: {_why(exc)}") from None
        self.steps.append(("login", True, f"as {username}"))

    def listing(self) -> list[tuple[int, str, int]]:
        """(number, unique id, size) of every message, in the server's order."""
        _, uid_lines, _ = self.client.uidl()
        _, size_lines, _ = self.client.list()
        sizes = {}
        for line in size_lines:
            number, _, size = line.decode("ascii", "replace").partition(" ")
            sizes[int(number)] = int(size.split()[0])
        found = []
        for line in uid_lines:
            number, _, uid = line.decode("ascii", "replace").partition(" ")
            uid = uid.strip()
            if not uid or len(uid) > MAX_UIDL:
                raise Pop3Error(f"the server gave a malformed unique id for message {number}")
            found.append((int(number), uid, sizes.get(int(number), 0)))
        return found

    def fetch(self, number: int) -> bytes:
        """The message, with CRLF line ends (``poplib`` undoes the dot-stuffing)."""
        _, lines, _ = self.client.retr(number)
        return b"".join(line + b"\r\n" for line in lines)

    def delete(self, number: int) -> None:
        self.client.dele(number)

    def quit(self) -> None:
        """QUIT: the server deletes what was marked (RFC 1939 §6, the UPDATE state)."""
        self.client.quit()

    def abandon(self) -> None:
        """Close without QUIT: nothing marked is deleted."""
        with contextlib.suppress(OSError):
            self.client.close()

    def interrupt(self) -> None:
        """From another thread: end the connection now, without QUIT (nothing marked
        is deleted), so a command blocked on a slow server returns at once."""
        sock = self.client.sock
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _text(value: bytes | str) -> str:
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    return "".join(c if c.isprintable() else "?" for c in text)[:200]


def _why(exc: BaseException) -> str:
    if isinstance(exc, poplib.error_proto) and exc.args:
        return _text(exc.args[0])
    return _text(str(exc) or type(exc).__name__)


@dataclass(frozen=True)
class Step:
    name: str
    ok: bool
    detail: str


def verify_pop3(config: GatewayConfig, connector: Pop3Connector) -> list[Step]:
    """``connector verify`` for a POP3 connector: connect, secure, log in to each
    mailbox and count its messages; nothing is fetched or deleted."""
    steps: list[Step] = []
    for box in connector.mailboxes:
        try:
            session = Pop3Session.connect(config, connector)
        except Pop3Error as exc:
            return [*steps, Step("connect", False, str(exc))]
        try:
            session.secure(config, connector)
            session.login(box.username, mailbox_password(config, connector, box))
            count = len(session.listing())
            session.steps.append(("mailbox", True, f"{box.username}: {count} message(s)"))
            session.quit()
        except (Pop3Error, OSError, poplib.error_proto) as exc:
            session.abandon()
            if session.steps[-1][1]:  # failed where no step said so
                session.steps.append(("mailbox", False, f"{box.username}: {_why(exc)}"))
        steps += [Step(*s) for s in session.steps]
    return steps
