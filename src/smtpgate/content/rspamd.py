"""Spam scanning with rspamd over its HTTP protocol (``POST /checkv2``).

The message is streamed from the spooled body (chunked transfer encoding:
no second copy of a large message in memory), with the envelope and session
facts as request headers (IP, Helo, Hostname, From, Rcpt once per recipient,
Queue-Id, User, TLS-Cipher/TLS-Version, MTA-Name). rspamd's action maps to
the gateway's (``verdict``): *reject* → 550 5.7.1 with rspamd's message,
*soft reject* / *greylist* → 451 4.7.1, *add header* → ``X-Spam-*`` fields,
*rewrite subject* → a Subject prefix, a score at or above
``quarantine_score`` → quarantine. An unreachable or confused rspamd is a
verdict too (``spam.rspamd.fail``): accept with ``X-Spam-Status: unchecked``
or 451; the outage is logged once, and its end once.

One ``httpx.AsyncClient`` (its connection pool) lives as long as the
scanner; every request is bounded by ``timeout`` as a whole, and rspamd's
reply by ``MAX_REPLY`` octets.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from smtpgate.config.schema import GatewayConfig, RspamdSettings
from smtpgate.content.headers import safe_value
from smtpgate.content.pipeline import MessageFacts
from smtpgate.content.verdict import ScanResult
from smtpgate.observe.log import get_logger
from smtpgate.proto.replies import Reply
from smtpgate.spool import SpooledBody

log = get_logger("smtpgate.content.rspamd")

NAME = "rspamd"
MAX_REPLY = 1 << 20  # octets of rspamd's JSON reply we read at most
MAX_MESSAGE = 200  # characters of rspamd's SMTP message passed on to the client
MAX_SYMBOLS = 900  # characters of the X-Spam-Symbols field
MAX_PREFIX = 64  # characters of a Subject prefix
CHUNK = 65536
UNAVAILABLE = Reply.of(451, "4.7.1", "Spam check unavailable, try again later")
UNCHECKED = "unchecked (rspamd unreachable)"


class RspamdError(Exception):
    """rspamd could not give a verdict (unreachable, HTTP error, garbage)."""


class RspamdScanner:
    """The spam scanner; one per gateway (its connection pool is kept)."""

    name = NAME

    def __init__(self) -> None:
        self._client: httpx.AsyncClient | None = None
        self.down = False  # in an outage (logged once at its start, once at its end)

    def applies(self, facts: MessageFacts, config: GatewayConfig) -> bool:
        return config.spam.rspamd is not None and facts.spam_check

    async def scan(
        self, facts: MessageFacts, body: SpooledBody, config: GatewayConfig
    ) -> ScanResult:
        settings = config.spam.rspamd
        if settings is None:
            return ScanResult(NAME)
        if body.size > settings.max_size:
            status = f"unchecked (larger than {settings.max_size} octets)"
            return ScanResult(NAME, headers=(("X-Spam-Status", status),), reason="too large")
        try:
            async with asyncio.timeout(settings.timeout):
                reply = await self._check(facts, body, settings)
            result = verdict(reply, settings, _subject(body) if _rewrites(reply) else "")
        except (RspamdError, httpx.HTTPError, OSError, TimeoutError, ValueError) as exc:
            return self._failed(settings, exc)
        if self.down:
            self.down = False
            log.info("rspamd reachable again", url=settings.url)
        return result

    def _failed(self, settings: RspamdSettings, exc: BaseException) -> ScanResult:
        error = _describe(exc)
        if not self.down:
            self.down = True
            log.warning("rspamd unreachable", url=settings.url, error=error, fail=settings.fail)
        if settings.fail == "closed":
            return ScanResult(NAME, "tempfail", UNAVAILABLE, reason=f"unavailable: {error}")
        return ScanResult(
            NAME, headers=(("X-Spam-Status", UNCHECKED),), reason=f"unchecked: {error}"
        )

    async def _check(
        self, facts: MessageFacts, body: SpooledBody, settings: RspamdSettings
    ) -> dict[str, Any]:
        client = self._client
        if client is None:
            client = self._client = httpx.AsyncClient(
                timeout=settings.timeout, follow_redirects=False, trust_env=False
            )
        headers = [
            (k.encode("ascii"), v) for k, v in request_headers(facts, settings.password_file)
        ]
        request = client.build_request(
            "POST", settings.url + "/checkv2", headers=headers, content=_content(body)
        )
        response = await client.send(request, stream=True)
        try:
            data = bytearray()
            async for chunk in response.aiter_raw():
                data += chunk
                if len(data) > MAX_REPLY:
                    raise RspamdError(f"reply larger than {MAX_REPLY} octets")
        finally:
            await response.aclose()
        if response.status_code != 200:
            raise RspamdError(f"HTTP {response.status_code}")
        try:
            parsed = json.loads(bytes(data))
        except ValueError:
            raise RspamdError("reply is not JSON") from None
        if not isinstance(parsed, dict) or not isinstance(parsed.get("action"), str):
            raise RspamdError("reply has no action")
        return parsed

    async def aclose(self) -> None:
        """Close the connection pool (the gateway stops)."""
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def _content(body: SpooledBody) -> bytes | AsyncIterator[bytes]:
    """A body still in memory (small: below the spool's threshold) as it is, with a
    Content-Length; a body spilled to disk streamed from its file (chunked)."""
    if body.path is None:
        return b"".join(body.chunks(CHUNK))
    return _stream(body)


async def _stream(body: SpooledBody) -> AsyncIterator[bytes]:
    """The body in pieces (a spilled body is read from its file as it is sent)."""
    for chunk in body.chunks(CHUNK):
        yield chunk


def _header(value: str) -> bytes:
    """A request header value: one line, UTF-8 (SMTPUTF8 addresses stay intact)."""
    return re.sub(r"[\x00-\x1f\x7f]+", " ", value).strip().encode("utf-8")


def request_headers(facts: MessageFacts, password_file: Path | None) -> list[tuple[str, bytes]]:
    """rspamd's protocol headers for one message (Rcpt once per recipient)."""
    envelope = facts.envelope
    out = [
        ("Queue-Id", _header(facts.queue_id)),
        ("MTA-Name", _header(facts.hostname)),
        ("From", _header(envelope.sender or "<>")),
    ]
    out += [("Rcpt", _header(r.address)) for r in envelope.recipients]
    if envelope.client_ip:
        out.append(("IP", _header(envelope.client_ip)))
    if envelope.helo:
        out.append(("Helo", _header(envelope.helo)))
    if facts.client_name:  # forward-confirmed; otherwise rspamd looks the name up itself
        out.append(("Hostname", _header(facts.client_name)))
    if envelope.auth_user:
        out.append(("User", _header(envelope.auth_user)))
    if envelope.tls:
        version, _sep, cipher = envelope.tls.partition(" ")
        out.append(("TLS-Version", _header(version)))
        if cipher:
            out.append(("TLS-Cipher", _header(cipher)))
    if password_file is not None:
        out.append(("Password", _header(password_file.read_text().strip())))
    return out


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | httpx.TimeoutException):
        return "timed out"
    text = str(exc) or type(exc).__name__
    return safe_value(text)[:200]


def _rewrites(reply: dict[str, Any]) -> bool:
    return reply.get("action") == "rewrite subject"


def _subject(body: SpooledBody) -> str:
    """The message's Subject (unfolded), or ``""``."""
    found = re.search(rb"(?im)^subject:(.*(?:\r\n[ \t].*)*)", body.head(64 * 1024))
    if found is None:
        return ""
    return " ".join(found.group(1).decode("utf-8", "replace").split())


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0
    return float(value)


def _message(reply: dict[str, Any], default: str) -> str:
    """rspamd's SMTP message (sanitised, bounded), or ``default``."""
    messages = reply.get("messages")
    text = messages.get("smtp_message") if isinstance(messages, dict) else None
    if not isinstance(text, str):
        return default
    text = safe_value(text)[:MAX_MESSAGE].strip()
    return text or default


def symbols_line(reply: dict[str, Any]) -> str:
    """``NAME(score)`` by descending weight, bounded to ``MAX_SYMBOLS`` characters."""
    symbols = reply.get("symbols")
    if not isinstance(symbols, dict):
        return ""
    ranked = sorted(
        (
            (_number(v.get("score")) if isinstance(v, dict) else 0.0, str(k))
            for k, v in symbols.items()
        ),
        key=lambda item: (-abs(item[0]), item[1]),
    )
    out = ""
    for score, name in ranked:
        item = f"{safe_value(name)[:64]}({score:.2f})"
        if len(out) + len(item) + 2 > MAX_SYMBOLS:
            return out + ", ..."
        out = f"{out}, {item}" if out else item
    return out


def subject_prefix(new_subject: object, old_subject: str) -> str:
    """The prefix rspamd's rewritten ``subject`` puts before ``old_subject``
    (rspamd returns the whole new Subject); ``[SPAM]`` when it cannot tell."""
    if not isinstance(new_subject, str) or not new_subject.strip():
        return "[SPAM]"
    new, old = " ".join(new_subject.split()), old_subject.strip()
    if old and new.endswith(old) and len(new) > len(old):
        prefix = new[: -len(old)].strip()
    elif not old:
        prefix = new
    else:
        prefix = "[SPAM]"
    return safe_value(prefix)[:MAX_PREFIX] or "[SPAM]"


def verdict(reply: dict[str, Any], settings: RspamdSettings, old_subject: str = "") -> ScanResult:
    """The gateway's action for rspamd's parsed ``/checkv2`` reply."""
    action = str(reply.get("action"))
    score = _number(reply.get("score"))
    required = _number(reply.get("required_score"))
    symbols = symbols_line(reply)
    detail: dict[str, Any] = {"action": action, "score": score, "symbols": symbols}
    reason = f"{action}, score {score:.2f}/{required:.2f}"
    if action == "reject":
        reply_ = Reply.of(550, "5.7.1", _message(reply, "Message rejected as spam"))
        return ScanResult(NAME, "reject", reply_, reason=reason, detail=detail)
    if action in ("soft reject", "greylist"):
        default = "Greylisted, try again later" if action == "greylist" else "Try again later"
        reply_ = Reply.of(451, "4.7.1", _message(reply, default))
        return ScanResult(NAME, "tempfail", reply_, reason=reason, detail=detail)
    known = ("no action", "add header", "rewrite subject", "discard", "quarantine")
    if action not in known:
        raise RspamdError(f"unknown action {safe_value(action)[:40]!r}")
    spam = action != "no action"
    headers: tuple[tuple[str, str], ...] = ()
    if settings.headers:
        status = f"{'Yes' if spam else 'No'}, score={score:.2f} required={required:.2f}"
        headers = (("X-Spam-Status", f"{status} action={action}"),)
        headers += (("X-Spam-Score", f"{score:.2f}"),)
        if spam:
            headers = (("X-Spam-Flag", "YES"), *headers)
            if symbols:
                headers += (("X-Spam-Symbols", symbols),)
    prefix = (
        subject_prefix(reply.get("subject"), old_subject) if action == "rewrite subject" else ""
    )
    held = action in ("discard", "quarantine") or (
        settings.quarantine_score is not None and score >= settings.quarantine_score
    )
    return ScanResult(
        NAME,
        "quarantine" if held else "accept",
        headers=headers,
        subject_prefix=prefix,
        reason=reason,
        detail=detail,
    )
