"""Sender authentication of mail from outside: SPF, DKIM and DMARC.

The three results go into one ``Authentication-Results`` field with the
gateway's authserv-id (RFC 8601 §2.2); fields that already carry that id
came from outside and are forged (RFC 8601 §5): ``forged_results`` says which
to drop. DMARC (RFC 7489) is enforced per connection profile
(``dmarc_policy: enforce``): ``p=reject`` is a 550 5.7.1 naming DMARC,
``p=quarantine`` holds the message; ``report`` only writes the result.

The libraries (pyspf, dkimpy) are synchronous, so the checks run in a
thread of their own pool (:data:`THREADS` per process), not the event
loop's default executor: a few messages whose name servers answer slowly
would otherwise take all of its threads (six on two cores), every other
message's checks would queue behind them until their budget ran out, and a
check that times out is a temperror, which does not enforce DMARC. The
budget counts from the moment a check starts, and the wait for a thread is
bounded by the same budget: a message that finds every thread busy for that
long gets 451 4.7.0 where DMARC is enforced (never accepted unchecked), and
is accepted unchecked where the profile only reports. Every DNS lookup goes
to the gateway's name servers (``gateway.dns``), each bounded by its
timeout and all of one message together by ``sender_auth.timeout``
(``BoundedDns``). DKIM needs the message
in memory: up to ``sender_auth.max_message_bytes``; a larger message's
signatures are not verified (``dkim=neutral``) and a DMARC failure that a
signature might have passed is reported, not enforced.

A lookup that fails or times out is a ``temperror``; a DMARC verdict that
depends on one is not enforced (fail open: the message is accepted with the
result written), so a DNS outage never loses or refuses mail.
"""

from __future__ import annotations

import email.parser
import email.policy
import email.utils
import functools
import importlib.resources
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import dkim  # type: ignore[import-untyped]
import dns.exception
import dns.name
import dns.resolver
import spf  # type: ignore[import-untyped]
from publicsuffix2 import PublicSuffixList  # type: ignore[import-untyped]

from smtpgate.config.schema import DnsSettings, GatewayConfig
from smtpgate.content.pipeline import MessageFacts
from smtpgate.content.verdict import Action, ScanResult
from smtpgate.observe.log import get_logger
from smtpgate.pools import Pool, PoolBusy
from smtpgate.proto.replies import Reply
from smtpgate.spool import SpooledBody

log = get_logger("smtpgate.content.senderauth")

NAME = "dmarc"
BUSY = Reply.of(451, "4.7.0", "Sender authentication busy, try again later")
MAX_SIGNATURES = 5  # DKIM signatures verified per message (each costs a lookup)
MAX_LOOKUPS = 40  # DNS queries per message, all checks together
_TOKEN = re.compile(r"^[A-Za-z0-9._-]{1,253}$")
_DMARC = re.compile(rb"^v\s*=\s*DMARC1\s*(;|$)")


class TempDnsError(Exception):
    """A lookup timed out, failed, or the message's DNS budget is spent."""


class BoundedDns:
    """Synchronous lookups through the gateway's name servers: each bounded by
    ``gateway.dns.timeout``, all of one message by ``budget`` seconds and
    ``MAX_LOOKUPS`` queries. NXDOMAIN and no data are empty answers."""

    def __init__(self, settings: DnsSettings, budget: float) -> None:
        self._resolver = dns.resolver.Resolver(configure=not settings.nameservers)
        if settings.nameservers:
            self._resolver.nameservers = list(settings.nameservers)
            self._resolver.port = settings.port
        self._timeout = settings.timeout
        self._deadline = time.monotonic() + budget
        self.lookups = 0
        self.failures = 0  # lookups that timed out or failed (not NXDOMAIN)

    def resolve(self, name: str, rdtype: str) -> list[Any]:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise TempDnsError("time budget spent")
        self.lookups += 1
        if self.lookups > MAX_LOOKUPS:
            raise TempDnsError("too many lookups")
        try:
            answer = self._resolver.resolve(
                name, rdtype, lifetime=min(self._timeout, remaining), search=False
            )
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except (dns.exception.DNSException, OSError) as exc:
            self.failures += 1
            raise TempDnsError(f"{rdtype} {name}: {type(exc).__name__}") from None
        return list(answer)

    def txt(self, name: str) -> list[bytes]:
        """Each TXT record of ``name``, its strings joined (RFC 7208 §3.3)."""
        return [b"".join(r.strings) for r in self.resolve(name, "TXT")]

    def dkim_key(self, name: bytes, timeout: float = 0) -> bytes | None:
        """dkimpy's ``dnsfunc``: the first TXT record at ``name``, or None."""
        records = self.txt(name.decode("ascii", "replace"))
        return records[0] if records else None


class _SpfQuery(spf.query):  # type: ignore[misc]
    """pyspf's evaluation (RFC 7208) with its DNS through ``BoundedDns``: the
    ``dns`` method is pyspf's one place that asks DNS; lookup and void-lookup
    limits (RFC 7208 §4.6.4) stay pyspf's."""

    def __init__(self, resolver: BoundedDns, ip: str, sender: str, helo: str) -> None:
        self._bounded = resolver
        super().__init__(i=ip, s=sender, h=helo)

    def dns(
        self, name: Any, qtype: str, cnames: Any = None, ignore_void: bool = False
    ) -> list[Any]:
        key = (str(name).rstrip(".").lower(), qtype)
        if not key[0] or not all(0 < len(label) < 64 for label in key[0].split(".")):
            return []
        if key in self.cache:
            return list(self.cache[key])
        try:
            answer = self._bounded.resolve(key[0], qtype)
        except TempDnsError as exc:
            raise spf.TempError(f"DNS {exc}") from None
        result = [_spf_value(r, qtype) for r in answer]
        self.cache[key] = result
        if not result and not ignore_void:
            self.void_lookups += 1
            if self.void_lookups > spf.MAX_VOID_LOOKUPS:
                raise spf.PermError(f"Void lookup limit of {spf.MAX_VOID_LOOKUPS} exceeded")
        return result


def _spf_value(rdata: Any, qtype: str) -> Any:
    """An answer in the shape pyspf's own lookups give."""
    if qtype in ("A", "AAAA"):
        return rdata.address
    if qtype == "MX":
        return (rdata.preference, rdata.exchange)
    if qtype == "PTR":
        return rdata.target.to_text(True)
    return rdata.strings  # TXT: the record's strings


# -- the results ---------------------------------------------------------------


@dataclass(frozen=True)
class SpfResult:
    result: str  # pass fail softfail neutral none permerror temperror
    domain: str  # the domain checked: MAIL FROM's, or HELO's for the null sender
    identity: Literal["mailfrom", "helo"]


@dataclass(frozen=True)
class DkimResult:
    result: str  # pass fail neutral temperror permerror
    domain: str = ""
    selector: str = ""
    b: str = ""  # the first characters of b= (RFC 6008), to tell signatures apart
    comment: str = ""


@dataclass(frozen=True)
class DmarcResult:
    result: str  # pass fail none temperror permerror
    from_domain: str = ""
    policy: str = ""  # none quarantine reject: the policy that applies (p or sp)
    disposition: str = "none"  # after pct (RFC 7489 §6.6.4)
    enforceable: bool = True  # False: a result we could not fully check
    comment: str = ""


@dataclass(frozen=True)
class Verdict:
    spf: SpfResult
    dkim: tuple[DkimResult, ...]
    dmarc: DmarcResult
    extra: dict[str, Any] = field(default_factory=dict)


def check_spf(resolver: BoundedDns, ip: str, sender: str, helo: str) -> SpfResult:
    """RFC 7208 ``check_host`` for MAIL FROM (or HELO when the sender is null)."""
    identity: Literal["mailfrom", "helo"] = "mailfrom" if sender else "helo"
    domain = sender.rpartition("@")[2].lower() if sender else helo.lower()
    try:
        result, _code, _why = _SpfQuery(resolver, ip, sender, helo).check()
    except Exception as exc:  # pyspf raises little, but a library must not cost the message
        log.warning("spf check failed", error=repr(exc))
        result = "temperror"
    return SpfResult(str(result), domain, identity)


def check_dkim(resolver: BoundedDns, message: bytes) -> tuple[DkimResult, ...]:
    """Each DKIM-Signature (the first ``MAX_SIGNATURES``), verified (RFC 6376 §6)."""
    try:
        verifier = dkim.DKIM(message, minkey=1024)
        count = len([f for f, _v in verifier.headers if f.lower() == b"dkim-signature"])
    except Exception:
        return (DkimResult("permerror", comment="unparsable message"),)
    results = []
    for idx in range(min(count, MAX_SIGNATURES)):
        results.append(_verify_one(verifier, idx, resolver))
    return tuple(results)


def _verify_one(verifier: Any, idx: int, resolver: BoundedDns) -> DkimResult:
    try:
        ok = verifier.verify(idx=idx, dnsfunc=resolver.dkim_key)
        result, comment = ("pass", "") if ok else ("fail", "")
    except TempDnsError as exc:
        result, comment = "temperror", str(exc)
    except dkim.DKIMException as exc:
        result, comment = "permerror", type(exc).__name__
    except Exception as exc:
        result, comment = "permerror", type(exc).__name__
    fields = getattr(verifier, "signature_fields", {}) or {}
    return DkimResult(
        result,
        _token(fields.get(b"d", b"")).lower(),
        _token(fields.get(b"s", b"")),
        re.sub(rb"\s", b"", fields.get(b"b", b""))[:8].decode("ascii", "replace"),
        comment,
    )


def _token(value: bytes | str) -> str:
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
    return text if _TOKEN.match(text) else ""


@functools.cache
def _suffixes() -> Any:
    """The public suffix list bundled with authheaders (offline, no download)."""
    ref = importlib.resources.files("authheaders") / "public_suffix_list.txt"
    with importlib.resources.as_file(ref) as path, path.open(encoding="utf-8") as lines:
        return PublicSuffixList(lines)


def organizational_domain(domain: str) -> str:
    """The registered domain: the public suffix and one label more (RFC 7489
    §3.2); a TLD the list does not know is a suffix of its own (rule ``*``)."""
    name = domain.lower().rstrip(".")
    labels = name.split(".")
    suffix = _suffixes().get_tld(name) or labels[-1]
    keep = len(str(suffix).split(".")) + 1
    return ".".join(labels[-keep:]) if len(labels) >= keep else name


def aligned(from_domain: str, other: str, mode: str) -> bool:
    """Identifier alignment (RFC 7489 §3.1): strict is equal, relaxed the same
    organizational domain."""
    if not other:
        return False
    if mode == "s":
        return from_domain == other
    return organizational_domain(from_domain) == organizational_domain(other)


def dmarc_record(resolver: BoundedDns, domain: str) -> dict[str, str] | None:
    """The one DMARC record at ``_dmarc.domain``, its tags (RFC 7489 §6.6.3);
    none or several: None."""
    records = [r for r in resolver.txt(f"_dmarc.{domain}") if _DMARC.match(r)]
    if len(records) != 1:
        return None
    tags = {}
    for part in records[0].decode("ascii", "replace").split(";"):
        key, eq, value = part.partition("=")
        if eq:
            tags[key.strip().lower()] = value.strip()
    return tags


def header_from(head: bytes) -> list[str]:
    """The RFC5322.From domains (RFC 7489 §6.6.1): one per address."""
    message = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(head)
    values = [str(v) for v in message.get_all("From", [])]
    addresses = email.utils.getaddresses(values)
    return [addr.rpartition("@")[2].strip().lower().rstrip(".") for _name, addr in addresses]


def check_dmarc(
    resolver: BoundedDns,
    from_domains: list[str],
    spf_result: SpfResult,
    dkim_results: tuple[DkimResult, ...],
    dkim_unverified: bool,
) -> DmarcResult:
    """RFC 7489 §6.6: the policy of the From domain (or its organizational
    domain's ``sp``), and whether SPF or a DKIM signature passed aligned."""
    if len(from_domains) != 1 or not _token(from_domains[0]) or "." not in from_domains[0]:
        return DmarcResult("permerror", comment="not exactly one From domain")
    from_domain = from_domains[0]
    org = organizational_domain(from_domain)
    try:
        record = dmarc_record(resolver, from_domain)
        policy_tag = "p"
        if record is None and org != from_domain:
            record = dmarc_record(resolver, org)
            policy_tag = "sp"
    except TempDnsError as exc:
        return DmarcResult("temperror", from_domain, enforceable=False, comment=str(exc))
    if record is None:
        return DmarcResult("none", from_domain)
    policy = record.get(policy_tag, record.get("p", "")).lower()
    if policy not in ("none", "quarantine", "reject"):
        policy = record.get("p", "").lower()
    if policy not in ("none", "quarantine", "reject"):
        return DmarcResult("none", from_domain, comment="no valid policy")
    spf_ok = spf_result.result == "pass" and aligned(
        from_domain, spf_result.domain, record.get("aspf", "r").lower()
    )
    dkim_ok = any(
        d.result == "pass" and aligned(from_domain, d.domain, record.get("adkim", "r").lower())
        for d in dkim_results
    )
    if spf_ok or dkim_ok:
        return DmarcResult("pass", from_domain, policy)
    unsure = spf_result.result == "temperror" or any(d.result == "temperror" for d in dkim_results)
    if unsure:
        return DmarcResult("temperror", from_domain, policy, enforceable=False)
    disposition = _apply_pct(policy, record.get("pct", "100"))
    if dkim_unverified:
        return DmarcResult(
            "fail", from_domain, policy, disposition, False, "DKIM not verified: too large"
        )
    return DmarcResult("fail", from_domain, policy, disposition)


def _apply_pct(policy: str, pct: str) -> str:
    """RFC 7489 §6.6.4: outside the sampled pct, the next weaker policy."""
    try:
        share = max(0, min(100, int(pct)))
    except ValueError:
        share = 100
    if share >= 100 or random.randrange(100) < share:  # noqa: S311 - sampling, not secrecy
        return policy
    return {"reject": "quarantine", "quarantine": "none"}.get(policy, "none")


def authenticate(
    settings: DnsSettings,
    budget: float,
    facts: MessageFacts,
    head: bytes,
    message: bytes | None,
) -> Verdict:
    """Every check of one message (synchronous: run it in a thread).
    ``message`` None: too large to verify its DKIM signatures."""
    resolver = BoundedDns(settings, budget)
    envelope = facts.envelope
    spf_result = check_spf(resolver, facts.client_ip, envelope.sender, envelope.helo)
    signed = is_signed(head)
    if message is None:
        dkim_results: tuple[DkimResult, ...] = (
            (DkimResult("neutral", comment="message too large to verify"),) if signed else ()
        )
    else:
        dkim_results = check_dkim(resolver, message) if signed else ()
    dmarc_result = check_dmarc(
        resolver, header_from(head), spf_result, dkim_results, message is None and signed
    )
    extra = {"lookups": resolver.lookups, "dns_failures": resolver.failures}
    return Verdict(spf_result, dkim_results, dmarc_result, extra)


def is_signed(head: bytes) -> bool:
    """Whether the header section has a DKIM-Signature field."""
    return any(line.lower().startswith(b"dkim-signature:") for line in head.split(b"\r\n"))


# -- the header ----------------------------------------------------------------


def results_value(authserv_id: str, verdict: Verdict) -> str:
    """The ``Authentication-Results`` value (RFC 8601 §2.2)."""
    s = verdict.spf
    parts = [authserv_id]
    if s.domain and _token(s.domain):
        parts.append(f"spf={s.result} smtp.{s.identity}={s.domain}")
    else:
        parts.append(f"spf={s.result}")
    if not verdict.dkim:
        parts.append("dkim=none")
    for d in verdict.dkim:
        text = f"dkim={d.result}"
        if d.comment:
            text += f" ({_comment(d.comment)})"
        if d.domain:
            text += f" header.d={d.domain}"
        if d.selector:
            text += f" header.s={d.selector}"
        if d.b and _TOKEN.match(d.b.replace("+", "").replace("/", "")):
            text += f" header.b={d.b}"
        parts.append(text)
    m = verdict.dmarc
    text = f"dmarc={m.result}"
    notes = []
    if m.policy:
        notes.append(f"p={m.policy} dis={m.disposition if m.result == 'fail' else 'none'}")
    if m.comment:
        notes.append(_comment(m.comment))
    if notes:
        text += f" ({'; '.join(notes)})"
    if m.from_domain:
        text += f" header.from={m.from_domain}"
    parts.append(text)
    return "; ".join(parts)


def _comment(text: str) -> str:
    return re.sub(r"[()\\;]", " ", text).strip()


def authserv_id(config: GatewayConfig) -> str:
    return config.sender_auth.authserv_id or config.gateway.hostname


def forged_results(config: GatewayConfig, internal: bool) -> Callable[[bytes], bool] | None:
    """A ``drop`` test for ``Authentication-Results`` fields that claim our
    authserv-id on mail from outside (RFC 8601 §5); None where we do not verify."""
    if not config.sender_auth.verify or internal:
        return None
    ours = authserv_id(config).lower().encode("ascii", "replace")

    def forged(item: bytes) -> bool:
        name, _colon, value = item.partition(b":")
        if name.strip().lower() != b"authentication-results":
            return False
        value = re.sub(rb"\([^()]*\)", b" ", value)  # CFWS may precede the id
        claimed = re.split(rb"[\s;]", value.strip(), maxsplit=1)[0]
        return claimed.lower() == ours

    return forged


def dmarc_setting(config: GatewayConfig, profile: str) -> str:
    """The client's profile's ``dmarc_policy`` (enforce or report)."""
    for candidate in config.connection_profiles:
        if candidate.name == profile:
            return candidate.dmarc_policy
    return config.default_profile.dmarc_policy


# -- the scanner ---------------------------------------------------------------


def read_bounded(body: SpooledBody, limit: int) -> bytes | None:
    """The whole message, or None when it is larger than ``limit`` octets."""
    if body.size > limit:
        return None
    parts, seen = [], 0
    for chunk in body.chunks():
        seen += len(chunk)
        if seen > limit:
            return None
        parts.append(chunk)
    return b"".join(parts)


THREADS = 64  # checks at once per process; a thread waiting for DNS costs little
POOL = Pool("senderauth", THREADS)


class SenderAuth:
    """SPF, DKIM and DMARC for mail from outside (``not facts.internal``)."""

    name = NAME

    def __init__(self) -> None:
        self._dns_down = False  # logged once per outage, not per message

    def applies(self, facts: MessageFacts, config: GatewayConfig) -> bool:
        return config.sender_auth.verify and not facts.internal

    async def scan(
        self, facts: MessageFacts, body: SpooledBody, config: GatewayConfig
    ) -> ScanResult:
        budget = config.sender_auth.timeout
        try:
            verdict = await POOL.run(self._run, facts, body, config, limit=budget + 2, wait=budget)
        except PoolBusy as exc:
            return self._busy(facts, config, exc)
        except Exception as exc:  # never raises: an unexpected failure is a temperror
            log.warning("sender authentication failed", queue_id=facts.queue_id, error=repr(exc))
            verdict = Verdict(
                SpfResult("temperror", "", "mailfrom"),
                (),
                DmarcResult("temperror", enforceable=False, comment="check failed"),
            )
        self._watch_dns(config, verdict)
        return self._decide(facts, config, verdict)

    def _busy(self, facts: MessageFacts, config: GatewayConfig, exc: PoolBusy) -> ScanResult:
        """Every check thread waited on DNS for a whole budget. Where DMARC is
        enforced, the message is not taken unchecked (that would let a flood
        of slow domains open the door to forgeries): 451, the client tries
        again. Elsewhere it is accepted with the check's result unknown."""
        log.warning("sender authentication busy", queue_id=facts.queue_id, error=str(exc))
        if dmarc_setting(config, facts.envelope.profile) != "enforce":
            return ScanResult(NAME, reason="not checked: every check thread busy")
        return ScanResult(NAME, "tempfail", BUSY, reason="not checked: every check thread busy")

    def _watch_dns(self, config: GatewayConfig, verdict: Verdict) -> None:
        failed = verdict.extra.get("dns_failures", 0) > 0 or verdict.spf.result == "temperror"
        if failed and not self._dns_down:
            log.warning(
                "sender authentication: DNS lookups failing (results are temperror, "
                "DMARC not enforced)",
                nameservers=config.gateway.dns.nameservers or "system",
            )
        elif not failed and self._dns_down:
            log.info("sender authentication: DNS answering again")
        self._dns_down = failed

    def _run(self, facts: MessageFacts, body: SpooledBody, config: GatewayConfig) -> Verdict:
        settings = config.sender_auth
        head = body.head()
        # only a signed message is read whole (DKIM needs it in memory)
        message = read_bounded(body, settings.max_message_bytes) if is_signed(head) else b""
        return authenticate(config.gateway.dns, settings.timeout, facts, head, message)

    def _decide(self, facts: MessageFacts, config: GatewayConfig, verdict: Verdict) -> ScanResult:
        header = ("Authentication-Results", results_value(authserv_id(config), verdict))
        m = verdict.dmarc
        detail = {
            "spf": verdict.spf.result,
            "dkim": [d.result for d in verdict.dkim],
            "dmarc": m.result,
            "policy": m.policy,
        }
        reason = f"spf={verdict.spf.result} dmarc={m.result}"
        action: Action = "accept"
        reply = None
        if m.result == "fail" and m.disposition in ("reject", "quarantine"):
            enforce = dmarc_setting(config, facts.envelope.profile) == "enforce"
            if not m.enforceable:
                reason += f" (p={m.policy} not enforced: {m.comment})"
            elif not enforce:
                reason += f" (p={m.policy} reported: profile does not enforce)"
            elif m.disposition == "reject":
                action = "reject"
                reply = Reply.of(
                    550, "5.7.1", f"Message rejected by the DMARC policy of {m.from_domain}"
                )
                reason += f" (rejected by DMARC policy of {m.from_domain})"
            else:
                action = "quarantine"
                reason += f" (quarantined by DMARC policy of {m.from_domain})"
        return ScanResult(NAME, action, reply, (header,), reason=reason, detail=detail)
