"""The command grammar: verbs, reverse/forward paths and ESMTP parameters.

Pure functions; each returns a value or raises :class:`SyntaxProblem` carrying
the reply to send. Rules kept here:

* Paths are ``<...>`` (RFC 5321 §4.1.2); one space after ``FROM:``/``TO:`` is
  tolerated, as every major MTA does.  A source route (``<@a,@b:u@d>``) is
  accepted and dropped (RFC 5321 §4.1.2, Appendix C).
* Local part at most 64 octets, domain at most 255, path at most 256
  (RFC 5321 §4.5.3.1.1-3).
* Non-ASCII in an address only with SMTPUTF8 (RFC 6531 §3.4).
* A mailbox comes back with its domain in the one normal form of
  :mod:`smtpgate.model.domain` (lower case, A-labels, IDNA 2008 with UTS #46
  mapping), so the gateway decides on and relays exactly the same address;
  a domain IDNA 2008 refuses is a syntax error (501 5.1.3, or 5.1.7 for the
  sender, RFC 3463 §3.2).
* Unknown or repeated parameters are refused (RFC 5321 §4.1.1.11).
* Verbs, keywords and parameter names are ASCII (RFC 5321 §2.4): they are
  compared after upper-casing ASCII letters only (``str.upper`` turns the
  dotless i, U+0131, into ``I``, so "MA<U+0131>L" would pass for ``MAIL``),
  and numbers are ASCII digits only (``str.isdigit`` takes U+00B2 too).
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import Literal, cast

from smtpgate.model.domain import DomainError, normalise_domain
from smtpgate.model.envelope import MailParams, Notify, RcptParams
from smtpgate.proto.replies import NON_ASCII_ADDRESS, Reply

MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256
_NO_MAIL_PARAMS = MailParams()
_NO_RCPT_PARAMS = RcptParams()


class SyntaxProblem(Exception):  # noqa: N818 - a value carrying a reply, not an "error" of ours
    """A command could not be parsed; ``reply`` is what the client gets."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        super().__init__(reply.text())


@dataclass(frozen=True, slots=True)
class Command:
    """A command line split into its upper-cased verb and raw argument text."""

    verb: str
    argument: str


_ASCII_UPPER = str.maketrans(string.ascii_lowercase, string.ascii_uppercase)


def ascii_upper(text: str) -> str:
    """Upper-case the ASCII letters only; every other character stays as it is."""
    return text.translate(_ASCII_UPPER)


def ascii_digits(text: str) -> bool:
    """``text`` is one or more of 0-9 (``str.isdigit`` also takes U+00B2 and U+0661)."""
    return text.isascii() and text.isdigit()


def split_command(line: str) -> Command:
    """Split ``"mail FROM:<a@b>"`` into ``Command("MAIL", "FROM:<a@b>")``."""
    verb, _, argument = line.partition(" ")
    return Command(ascii_upper(verb), argument.strip(" "))


_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_STRING = re.compile(rf"^{_ATEXT}+(?:\.{_ATEXT}+)*$")
_QUOTED = re.compile(r'^"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"$')
_IPV4 = re.compile(r"^\d{1,3}(?:\.\d{1,3}){3}$")
_UTF8_ATOM = r"[^\x00-\x20\"(),.:;<>@\[\\\]\x7f]+"  # RFC 6531 §3.3: atext plus UTF-8
_UTF8_DOT_STRING = re.compile(rf"^{_UTF8_ATOM}(?:\.{_UTF8_ATOM})*$")


def _bad_address(sender: bool, why: str) -> SyntaxProblem:
    status = "5.1.7" if sender else "5.1.3"
    what = "sender" if sender else "recipient"
    return SyntaxProblem(Reply.of(501, status, f"Bad {what} address syntax: {why}"))


def _normal_domain(domain: str, sender: bool) -> str:
    """The domain in normal form; an address literal is kept as written."""
    if domain.startswith("[") and domain.endswith("]"):
        if not _valid_address_literal(domain[1:-1]):
            raise _bad_address(sender, "invalid address literal")
        return domain
    try:
        return normalise_domain(domain)
    except DomainError as exc:
        raise _bad_address(sender, f"invalid domain: {exc.reason}") from None


def _valid_address_literal(literal: str) -> bool:
    """RFC 5321 §4.1.3: ``[192.0.2.1]`` or ``[IPv6:2001:db8::1]``."""
    import ipaddress  # noqa: PLC0415 - only literals need it, and they are rare

    try:
        if ascii_upper(literal[:5]) == "IPV6:":
            ipaddress.IPv6Address(literal[5:])
            return True
        if _IPV4.match(literal):
            ipaddress.IPv4Address(literal)
            return True
    except ValueError:
        return False
    return False


def parse_mailbox(text: str, *, sender: bool, smtputf8: bool) -> str:
    """Validate ``local@domain``; return it with the domain in normal form
    (``jörg@Bücher.example`` → ``jörg@xn--bcher-kva.example``)."""
    local, at, domain = text.rpartition("@")
    if not at or not local or not domain:
        raise _bad_address(sender, "missing local part or domain")
    if not text.isascii() and not smtputf8:
        raise SyntaxProblem(NON_ASCII_ADDRESS)
    if len(local.encode()) > MAX_LOCAL_PART:
        raise _bad_address(sender, f"local part longer than {MAX_LOCAL_PART} octets")
    if len(domain.encode()) > MAX_DOMAIN:
        raise _bad_address(sender, f"domain longer than {MAX_DOMAIN} octets")
    dot_string = _UTF8_DOT_STRING if smtputf8 else _DOT_STRING
    if not (dot_string.match(local) or _QUOTED.match(local)):
        raise _bad_address(sender, "invalid local part")
    return f"{local}@{_normal_domain(domain, sender)}"


def parse_path(text: str, *, sender: bool, smtputf8: bool) -> tuple[str, str]:
    """Parse ``<path> params`` into (mailbox, parameter text).

    The null path ``<>`` is only valid as a sender (RFC 5321 §4.5.5).
    """
    if not text.startswith("<"):
        raise _bad_address(sender, "the address must be enclosed in <>")
    end = _closing_bracket(text)
    if end < 0:
        raise _bad_address(sender, "missing >")
    inner, rest = text[1:end], text[end + 1 :]
    if rest and not rest.startswith(" "):
        raise _bad_address(sender, "text after >")
    if len(inner.encode()) + 2 > MAX_PATH:
        raise _bad_address(sender, f"path longer than {MAX_PATH} octets")
    if inner == "":
        if not sender:
            raise _bad_address(sender, "empty recipient")
        return "", rest.strip(" ")
    if inner.startswith("@"):
        _route, colon, inner = inner.partition(":")
        if not colon:
            raise _bad_address(sender, "unterminated source route")
    return parse_mailbox(inner, sender=sender, smtputf8=smtputf8), rest.strip(" ")


def _closing_bracket(text: str) -> int:
    """Index of the ``>`` closing the path, skipping quoted local parts."""
    if '"' not in text:
        return text.find(">")
    quoted = escaped = False
    for i, ch in enumerate(text):
        if escaped:
            escaped = False
        elif ch == "\\" and quoted:
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == ">" and not quoted:
            return i
    return -1


def decode_xtext(text: str) -> str:
    """RFC 3461 §4: ``+XX`` hex escapes; other chars must be printable ASCII."""
    out: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "+":
            hexpart = text[i + 1 : i + 3]
            if len(hexpart) != 2 or not all(c in "0123456789ABCDEF" for c in hexpart):
                raise SyntaxProblem(Reply.of(501, "5.5.4", "Error: malformed xtext"))
            out.append(chr(int(hexpart, 16)))
            i += 3
            continue
        if not "!" <= ch <= "~" or ch == "=":
            raise SyntaxProblem(Reply.of(501, "5.5.4", "Error: malformed xtext"))
        out.append(ch)
        i += 1
    return "".join(out)


def _keyword(text: str) -> bool:
    """esmtp-keyword (RFC 5321 §4.1.2): ASCII letters, digits and hyphens."""
    return text.isascii() and text.replace("-", "").isalnum()


def split_params(text: str) -> dict[str, str | None]:
    """``"SIZE=10 SMTPUTF8"`` → ``{"SIZE": "10", "SMTPUTF8": None}``; no repeats."""
    params: dict[str, str | None] = {}
    for word in text.split():
        key, eq, value = word.partition("=")
        key = ascii_upper(key)
        if not key or not _keyword(key) or (eq and not value):
            raise SyntaxProblem(Reply.of(501, "5.5.4", f"Error: bad parameter {word!r}"))
        if key in params:
            raise SyntaxProblem(Reply.of(501, "5.5.4", f"Error: duplicate parameter {key}"))
        params[key] = value if eq else None
    return params


def _unsupported(key: str) -> SyntaxProblem:
    return SyntaxProblem(Reply.of(555, "5.5.4", f"Error: unsupported parameter {key}"))


def _bad_value(key: str) -> SyntaxProblem:
    return SyntaxProblem(Reply.of(501, "5.5.4", f"Error: bad value for {key}"))


def _choice(key: str, value: str | None, allowed: tuple[str, ...]) -> str:
    if value is None or ascii_upper(value) not in allowed:
        raise _bad_value(key)
    return ascii_upper(value)


def parse_mail_params(params: dict[str, str | None]) -> MailParams:
    """Interpret MAIL FROM parameters (SIZE, BODY, SMTPUTF8, RET, ENVID, AUTH)."""
    if not params:
        return _NO_MAIL_PARAMS
    size: int | None = None
    raw_size = params.get("SIZE")
    if "SIZE" in params:
        if raw_size is None or not ascii_digits(raw_size) or len(raw_size) > 20:
            raise _bad_value("SIZE")
        size = int(raw_size)
    if "SMTPUTF8" in params and params["SMTPUTF8"] is not None:
        raise _bad_value("SMTPUTF8")
    for key in params:
        if key not in {"SIZE", "BODY", "SMTPUTF8", "RET", "ENVID", "AUTH"}:
            raise _unsupported(key)
    body = _choice("BODY", params["BODY"], ("7BIT", "8BITMIME")) if "BODY" in params else None
    ret = _choice("RET", params["RET"], ("FULL", "HDRS")) if "RET" in params else None
    envid = decode_xtext(params["ENVID"] or "") if "ENVID" in params else None
    if envid is not None and (not envid or len(envid) > 100):
        raise _bad_value("ENVID")  # RFC 3461 §4.4: at most 100 characters
    auth = decode_xtext(params["AUTH"] or "") if "AUTH" in params else None
    return MailParams(
        size=size,
        body=cast(Literal["7BIT", "8BITMIME"] | None, body),
        smtputf8="SMTPUTF8" in params,
        ret=cast(Literal["FULL", "HDRS"] | None, ret),
        envid=envid,
        auth=auth,
    )


_NOTIFY_WORDS: frozenset[str] = frozenset({"SUCCESS", "FAILURE", "DELAY"})


def _parse_notify(value: str | None) -> frozenset[Notify]:
    """RFC 3461 §4.1: NEVER alone, or a list of SUCCESS, FAILURE, DELAY."""
    words = [ascii_upper(w) for w in (value or "").split(",")]
    if words == ["NEVER"]:
        return frozenset()
    if not words or any(w not in _NOTIFY_WORDS for w in words) or len(set(words)) != len(words):
        raise _bad_value("NOTIFY")
    return frozenset(cast(list[Notify], words))


def _parse_orcpt(value: str | None) -> tuple[str, str]:
    """RFC 3461 §4.2: ``addr-type ";" xtext`` (RFC 6533 adds ``utf-8``)."""
    addr_type, semi, encoded = (value or "").partition(";")
    if not semi or not addr_type or not encoded or not _keyword(addr_type):
        raise _bad_value("ORCPT")
    decoded = decode_xtext(encoded)
    if len(decoded) > 500:
        raise _bad_value("ORCPT")
    return addr_type.lower(), decoded


def parse_rcpt_params(params: dict[str, str | None]) -> RcptParams:
    """Interpret RCPT TO parameters (NOTIFY, ORCPT)."""
    if not params:
        return _NO_RCPT_PARAMS
    for key in params:
        if key not in {"NOTIFY", "ORCPT"}:
            raise _unsupported(key)
    notify = _parse_notify(params["NOTIFY"]) if "NOTIFY" in params else None
    orcpt = _parse_orcpt(params["ORCPT"]) if "ORCPT" in params else None
    return RcptParams(notify=notify, orcpt=orcpt)


def parse_bdat(argument: str) -> tuple[int, bool] | None:
    """RFC 3030 §2: ``BDAT <size> [LAST]`` → (size, last), or None if malformed."""
    words = argument.split()
    if not words or not ascii_digits(words[0]) or len(words[0]) > 20:
        return None
    if len(words) == 1:
        return int(words[0]), False
    if len(words) == 2 and ascii_upper(words[1]) == "LAST":
        return int(words[0]), True
    return None
