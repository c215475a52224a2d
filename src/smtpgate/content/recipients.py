"""Recipient validation at RCPT: a static list, or an SMTP callout, per hosted domain.

``recipient_validation`` names, per hosted domain, how RCPT checks the
recipient once the relay decision accepted it (``smtpgate.policy.recipients``
finds the rule). Unknown recipients are refused at RCPT with
``550 5.1.1 <addr>: Recipient address rejected: user unknown``, so that the
gateway never accepts mail it would have to bounce later (backscatter);
when the answer cannot be had, ``451 4.4.3``: never a 250.

* ``list``: the inline ``recipients`` and the lines of ``recipients_file``
  (local parts or addresses at the domain, ``#`` comments), compared without
  regard to case. The file is re-read when its modification time or size
  changes and is bounded (:data:`MAX_FILE_BYTES`); a file that becomes
  unreadable keeps the last good list (logged once); with none, RCPT gets 451.
* ``callout``: a probe through the recipient's send connector
  (``content.callout``). Results are cached per address, valid ones for
  ``positive_ttl`` and unknown ones for ``negative_ttl`` (a bounded LRU per
  domain); temporary failures are never cached. At most ``concurrency``
  probes run at once per connector, and waiting for a turn counts against
  ``timeout``. A destination that stops answering is logged once per outage.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smtpgate.config.schema import (
    CalloutSettings,
    LdapSettings,
    RecipientValidation,
    SendConnector,
)
from smtpgate.content.callout import Asker, CalloutResult, Probe, bounded
from smtpgate.dns import Resolver
from smtpgate.observe.log import get_logger
from smtpgate.policy.recipients import entry_key, exempt, local_key, validation_rule
from smtpgate.policy.relay import split_address
from smtpgate.proto.replies import Reply
from smtpgate.snapshot import Snapshot

log = get_logger("smtpgate.recipients")

MAX_FILE_BYTES = 4 * 1024 * 1024  # a recipients_file larger than this is refused

Check = Reply | None | Coroutine[Any, Any, Reply | None]


def unknown_user(recipient: str) -> Reply:
    return Reply.of(550, "5.1.1", f"<{recipient}>: Recipient address rejected: user unknown")


def unavailable(recipient: str) -> Reply:
    return Reply.of(451, "4.4.3", f"<{recipient}>: recipient verification temporarily unavailable")


@dataclass
class _ListFile:
    stamp: tuple[int, int]  # (mtime_ns, size) of the version read
    keys: frozenset[str]


@dataclass
class _Cache:
    """Per-address results with expiry, least recently used dropped first."""

    size: int
    entries: OrderedDict[str, tuple[bool, float]] = field(default_factory=OrderedDict)

    def get(self, key: str, now: float) -> bool | None:
        found = self.entries.get(key)
        if found is None:
            return None
        if found[1] <= now:
            del self.entries[key]
            return None
        self.entries.move_to_end(key)
        return found[0]

    def put(self, key: str, valid: bool, until: float) -> None:
        if self.size <= 0:
            return
        self.entries[key] = (valid, until)
        self.entries.move_to_end(key)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)


@dataclass
class RecipientValidator:
    """What outlives one configuration: list files read, cached results, the
    callout turns per connector, and which destinations are down."""

    clock: Callable[[], float] = time.monotonic
    files: dict[Path, _ListFile] = field(default_factory=dict)
    file_trouble: dict[Path, str] = field(default_factory=dict)  # logged once per problem
    caches: dict[str, _Cache] = field(default_factory=dict)  # domain → its cache
    turns: dict[str, tuple[int, asyncio.Semaphore]] = field(default_factory=dict)  # per connector
    down: set[str] = field(default_factory=set)  # destinations that do not answer
    probes: int = 0  # callouts and lookups made (for status and tests)

    def check(
        self,
        snapshot: Snapshot,
        resolver: Resolver,
        recipient: str,
        connector: SendConnector | None,
    ) -> Check:
        """``None``: accepted; a ``Reply``: refused (550) or deferred (451); a
        coroutine: a callout is needed, await it (it never raises)."""
        rule = validation_rule(snapshot.config, recipient)
        if rule is None or rule.mode == "any" or exempt(recipient):
            return None
        if rule.mode == "list":
            return self._listed(rule, recipient)
        key = recipient.casefold()
        settings = rule.ldap if rule.mode == "ldap" else rule.callout
        assert settings is not None  # the schema demands ldap settings for mode ldap
        known = self._cache(rule.domain, settings.cache_size).get(key, self.clock())
        if known is not None:
            return None if known else unknown_user(recipient)
        if rule.ldap is not None and rule.mode == "ldap":
            # ldap3 is imported when a directory is configured, not by every gateway
            from smtpgate.content.ldaplookup import Lookup  # noqa: PLC0415

            lookup = Lookup(rule.ldap, tuple(snapshot.config.tls.ca_files))
            return self._ask(rule.domain, rule.ldap, f"ldap {rule.ldap.url}", lookup, recipient)
        if connector is None:  # routing refuses before this; never a 250 unchecked
            return unavailable(recipient)
        probe = Probe(snapshot, resolver, connector, snapshot.config.gateway.hostname)
        return self._ask(rule.domain, rule.callout, f"connector {connector.name}", probe, recipient)

    # -- lists -----------------------------------------------------------------------

    def _listed(self, rule: RecipientValidation, recipient: str) -> Reply | None:
        local = local_key(recipient)
        if local in {entry_key(e) for e in rule.recipients}:
            return None
        if rule.recipients_file is None:
            return unknown_user(recipient)
        keys = self._file(rule)
        if keys is None:
            return unavailable(recipient)
        return None if local in keys else unknown_user(recipient)

    def _file(self, rule: RecipientValidation) -> frozenset[str] | None:
        """The file's entries, re-read when it changed; the last good ones when it
        cannot be read now; None when it never could."""
        path = rule.recipients_file
        assert path is not None
        known = self.files.get(path)
        try:
            status = path.stat()
            stamp = (status.st_mtime_ns, status.st_size)
            if known is not None and known.stamp == stamp:
                return known.keys
            keys = _read_list(path, rule.domain)
        except (OSError, UnicodeDecodeError) as exc:
            self._file_problem(path, str(exc), kept=known is not None)
            return known.keys if known is not None else None
        self.files[path] = _ListFile(stamp, keys)
        if self.file_trouble.pop(path, None) is not None or known is not None:
            log.info("recipients file read", path=str(path), entries=len(keys))
        return keys

    def _file_problem(self, path: Path, problem: str, *, kept: bool) -> None:
        if self.file_trouble.get(path) != problem:
            self.file_trouble[path] = problem
            log.warning(
                "recipients file unreadable",
                path=str(path),
                error=problem,
                using="the last good version" if kept else "none: RCPT answers 451",
            )

    # -- callouts and directory lookups ----------------------------------------------

    def _cache(self, domain: str, size: int) -> _Cache:
        cache = self.caches.get(domain)
        if cache is None or cache.size != size:
            cache = self.caches[domain] = _Cache(size)
        return cache

    def _turns(self, destination: str, limit: int) -> asyncio.Semaphore:
        """The destination's turns; a changed ``concurrency`` starts new ones (asks
        holding the old turns finish on them)."""
        found = self.turns.get(destination)
        if found is None or found[0] != limit:
            found = self.turns[destination] = (limit, asyncio.Semaphore(limit))
        return found[1]

    async def _ask(
        self,
        domain: str,
        settings: CalloutSettings | LdapSettings,
        destination: str,
        asker: Asker,
        recipient: str,
    ) -> Reply | None:
        started = self.clock()
        try:
            async with asyncio.timeout(settings.timeout):
                async with self._turns(destination, settings.concurrency):
                    self.probes += 1
                    left = settings.timeout - (self.clock() - started)
                    result = await bounded(asker, recipient, max(left, 0.001))
        except TimeoutError:
            result = CalloutResult("unknown", "no turn in time", reached=False)
        except Exception as exc:  # a Pending must never raise: 451, logged
            log.error("recipient check failed", rcpt=recipient, at=destination, error=repr(exc))
            result = CalloutResult("unknown", repr(exc))
        self._note(destination, result)
        now, key = self.clock(), recipient.casefold()
        if result.result == "valid":
            self._cache(domain, settings.cache_size).put(key, True, now + settings.positive_ttl)
            return None
        if result.result == "invalid":
            self._cache(domain, settings.cache_size).put(key, False, now + settings.negative_ttl)
            log.info("recipient unknown", rcpt=recipient, at=destination, reply=result.detail)
            return unknown_user(recipient)
        log.info("recipient check inconclusive", rcpt=recipient, at=destination, why=result.detail)
        return unavailable(recipient)

    def _note(self, destination: str, result: CalloutResult) -> None:
        """A destination that stops answering is logged once, and again once it is back."""
        if not result.reached and destination not in self.down:
            self.down.add(destination)
            log.warning("recipient check destination down", at=destination, why=result.detail)
        elif result.reached and destination in self.down:
            self.down.discard(destination)
            log.warning("recipient check destination back", at=destination)


def _read_list(path: Path, domain: str) -> frozenset[str]:
    """A recipients file's entries: one local part or address per line; blank
    lines and ``#`` comments skipped, addresses at other domains ignored."""
    keys = set()
    with path.open("rb") as handle:
        data = handle.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise OSError(f"larger than {MAX_FILE_BYTES} bytes")
    for raw in data.decode("utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line or any(ch.isspace() for ch in line):
            continue
        if "@" in line and split_address(line)[1] != domain:
            continue
        keys.add(entry_key(line))
    return frozenset(keys)
