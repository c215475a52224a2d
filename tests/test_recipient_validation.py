"""Recipient validation's parts: the settings and their checks, what ``policy
explain`` says, list files (re-read, bounded, the last good version kept),
the callout cache (TTLs, size) with a fake clock, and the probe itself
against real SMTP servers on loopback (the project's sink, scripted)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pydantic
import pytest

from smtpgate.config import parse_config
from smtpgate.config.schema import GatewayConfig, LdapSettings, RecipientValidation
from smtpgate.config.validate import validate
from smtpgate.content.callout import Probe, bounded
from smtpgate.content.ldaplookup import Lookup, search_filter
from smtpgate.content.recipients import MAX_FILE_BYTES, RecipientValidator
from smtpgate.dns import DnsResolver
from smtpgate.policy.explain import Facts, explain
from smtpgate.policy.profile import ProfileIndex
from smtpgate.proto.replies import Reply
from smtpgate.sink import SinkBehaviour, build_sink, parse_reply
from smtpgate.snapshot import Snapshot
from tests.conftest import base_config, free_port, merge
from tests.slapd import MANAGER, PASSWORD, SUFFIX, Slapd, person, running_slapd


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _config(tmp_path: Path, port: int, rules: list[dict[str, Any]]) -> GatewayConfig:
    return parse_config(merge(base_config(tmp_path / "gw", port), {"recipient_validation": rules}))


# -- settings ---------------------------------------------------------------------------


def test_list_mode_needs_entries_and_entries_at_the_domain() -> None:
    with pytest.raises(pydantic.ValidationError, match="needs recipients or a recipients_file"):
        RecipientValidation.model_validate({"domain": "example.com", "mode": "list"})
    with pytest.raises(pydantic.ValidationError, match=r"not an address at example\.com"):
        RecipientValidation.model_validate(
            {"domain": "example.com", "mode": "list", "recipients": ["a@example.org"]}
        )
    with pytest.raises(pydantic.ValidationError, match="not a local part"):
        RecipientValidation.model_validate(
            {"domain": "example.com", "mode": "list", "recipients": ["a b"]}
        )
    rule = RecipientValidation.model_validate(
        {"domain": "Example.COM", "mode": "callout", "callout": {"positive_ttl": "2h"}}
    )
    assert (rule.domain, rule.callout.positive_ttl) == ("example.com", 7200.0)


def test_the_domain_must_be_hosted_and_have_one_rule(tmp_path: Path) -> None:
    document = merge(
        base_config(tmp_path / "gw", 25),
        {
            "recipient_validation": [
                {"domain": "example.net", "mode": "callout"},
                {"domain": "example.com", "mode": "callout"},
                {"domain": "example.com", "mode": "any"},
            ]
        },
    )
    problems = {p.path: p.message for p in validate(GatewayConfig.model_validate(document))}
    assert "example.net is not a hosted domain" in problems["recipient_validation[0].domain"]
    assert "example.com already has a rule" in problems["recipient_validation[2].domain"]
    assert "recipient_validation[1].domain" not in problems


def test_explain_says_how_each_recipient_is_validated(tmp_path: Path) -> None:
    config = _config(
        tmp_path,
        25,
        [
            {"domain": "example.com", "mode": "callout"},
            {"domain": "example.org", "mode": "list", "recipients": ["carol"]},
        ],
    )
    facts = Facts(
        "192.0.2.1",
        sender="x@sender.test",
        recipients=[
            "alice@example.com",
            "Carol@example.org",
            "dave@example.org",
            "postmaster@example.com",
        ],
    )
    result = explain(config, ProfileIndex(config), {}, facts)
    shown = [d.validation for d in result.recipients]
    assert (shown[0] or "").startswith("checked by callout at RCPT")
    assert shown[1] == "list: listed in recipients (accepted)"
    assert shown[2] == "list: not listed (550 5.1.1 at RCPT)"
    assert "postmaster is always accepted" in (shown[3] or "")
    assert "  validation: checked by callout at RCPT" in result.as_text()


# -- lists ------------------------------------------------------------------------------


def _snapshot(tmp_path: Path, rules: list[dict[str, Any]], port: int = 25) -> Snapshot:
    return Snapshot.compile(_config(tmp_path, port, rules), certificates=False)


def test_a_list_file_is_reread_when_it_changes(tmp_path: Path) -> None:
    listed = tmp_path / "rcpts"
    listed.write_text("alice\n# bob left\nCarol@EXAMPLE.org  # a comment\nzed@other.test\n")
    snap = _snapshot(
        tmp_path,
        [{"domain": "example.org", "mode": "list", "recipients_file": str(listed)}],
    )
    validator, resolver = RecipientValidator(), DnsResolver(snap.config.gateway.dns)

    def code(recipient: str) -> int:
        found = validator.check(snap, resolver, recipient, None)
        assert found is None or isinstance(found, Reply)
        return 250 if found is None else found.code

    assert [code(f"{u}@example.org") for u in ("alice", "ALICE", "bob", "carol", "zed")] == [
        250,
        250,
        550,
        250,
        550,
    ]
    listed.write_text("bob\n")
    assert [code("bob@example.org"), code("alice@example.org")] == [250, 550]
    # Unreadable now: the last good version stays in use.
    listed.unlink()
    assert [code("bob@example.org"), code("alice@example.org")] == [250, 550]
    assert listed in validator.file_trouble  # logged once, not per RCPT


def test_a_list_file_never_read_is_451_and_an_oversized_one_is_refused(tmp_path: Path) -> None:
    listed = tmp_path / "big"
    listed.write_bytes(b"alice\n" + b"x" * MAX_FILE_BYTES)
    snap = _snapshot(
        tmp_path,
        [
            {
                "domain": "example.org",
                "mode": "list",
                "recipients": ["ok"],
                "recipients_file": str(listed),
            }
        ],
    )
    validator = RecipientValidator()
    resolver = DnsResolver(snap.config.gateway.dns)
    refused = validator.check(snap, resolver, "alice@example.org", None)
    assert isinstance(refused, Reply)
    assert (refused.code, refused.status) == (451, "4.4.3")
    assert validator.check(snap, resolver, "ok@example.org", None) is None  # inline still counts
    assert validator.check(snap, resolver, "postmaster@example.org", None) is None


# -- callouts against real SMTP servers on loopback ---------------------------------------


async def _start(tmp_path: Path, name: str, behaviour: dict[str, Any]) -> tuple[Any, int]:
    sink = build_sink("127.0.0.1", 0, SinkBehaviour(tmp_path / name, fsync=False, **behaviour))
    await sink.start()
    return sink, sink.bound_ports()["sink"]


@pytest.fixture
async def servers(tmp_path: Path) -> AsyncIterator[dict[str, int]]:
    """Three internal servers: one that knows alice only, one that defers, one that
    refuses the null sender."""
    knows = await _start(
        tmp_path,
        "knows",
        {
            "rcpt_reply": parse_reply("550 5.1.1 no such user"),
            "refuse": {"alice@example.com": Reply.of(250, "2.1.5", "Ok")},
        },
    )
    defers = await _start(tmp_path, "defers", {"rcpt_reply": parse_reply("450 4.2.1 busy")})
    yield {"knows": knows[1], "defers": defers[1]}
    for server, _ in (knows, defers):
        await server.stop(1)


def _probe(tmp_path: Path, port: int) -> Probe:
    snap = _snapshot(tmp_path, [{"domain": "example.com", "mode": "callout"}], port)
    connector = snap.config.send_connectors[0]
    return Probe(snap, DnsResolver(snap.config.gateway.dns), connector, "gw.test")


async def test_probe_results(tmp_path: Path, servers: dict[str, int]) -> None:
    knows = _probe(tmp_path, servers["knows"])
    assert (await bounded(knows, "alice@example.com", 5)).result == "valid"
    unknown = await bounded(knows, "nobody@example.com", 5)
    assert (unknown.result, unknown.reached) == ("invalid", True)
    assert "550 5.1.1 no such user" in unknown.detail
    deferred = await bounded(_probe(tmp_path, servers["defers"]), "alice@example.com", 5)
    assert (deferred.result, deferred.reached) == ("unknown", True)
    down = await bounded(_probe(tmp_path, free_port()), "alice@example.com", 5)
    assert (down.result, down.reached) == ("unknown", False)


async def test_a_silent_server_is_a_timeout_not_a_hang(tmp_path: Path) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)  # never greets

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        started = asyncio.get_running_loop().time()
        result = await bounded(_probe(tmp_path, port), "alice@example.com", 0.5)
        assert result.result == "unknown"
        assert asyncio.get_running_loop().time() - started < 3
    finally:
        server.close()


async def test_callout_cache_ttls_and_size(tmp_path: Path, servers: dict[str, int]) -> None:
    snap = _snapshot(
        tmp_path,
        [
            {
                "domain": "example.com",
                "mode": "callout",
                "callout": {"positive_ttl": 60, "negative_ttl": 10, "cache_size": 2},
            }
        ],
        servers["knows"],
    )
    clock = Clock()
    validator = RecipientValidator(clock=clock)
    resolver = DnsResolver(snap.config.gateway.dns)
    connector = snap.config.send_connectors[0]

    async def answer(recipient: str) -> int:
        found = validator.check(snap, resolver, recipient, connector)
        if found is not None and not isinstance(found, Reply):
            found = await found
        return 250 if found is None else found.code

    assert [await answer("alice@example.com"), await answer("bob@example.com")] == [250, 550]
    assert validator.probes == 2
    assert [await answer("Alice@Example.com"), await answer("bob@example.com")] == [250, 550]
    assert validator.probes == 2  # both from the cache
    clock.now += 11  # the negative entry expired, the positive one not
    assert [await answer("alice@example.com"), await answer("bob@example.com")] == [250, 550]
    assert validator.probes == 3
    await answer("carol@example.com")  # a third address: the least recently used goes
    assert validator.probes == 4
    assert len(validator.caches["example.com"].entries) == 2
    assert await answer("alice@example.com") == 250
    assert validator.probes == 5


async def test_a_server_down_is_451_and_not_cached(tmp_path: Path) -> None:
    snap = _snapshot(tmp_path, [{"domain": "example.com", "mode": "callout"}], free_port())
    validator = RecipientValidator()
    resolver = DnsResolver(snap.config.gateway.dns)
    for _ in range(2):
        pending = validator.check(
            snap, resolver, "alice@example.com", snap.config.send_connectors[0]
        )
        assert pending is not None
        assert not isinstance(pending, Reply)
        reply = await pending
        assert reply is not None
        assert (reply.code, reply.status) == (451, "4.4.3")
    assert validator.probes == 2
    assert validator.down == {"connector to-sink"}


async def test_callouts_take_turns_per_connector(tmp_path: Path) -> None:
    """``concurrency: 1``: three probes at once reach the server one after another."""
    open_now, most = 0, 0
    release = asyncio.Event()

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal open_now, most
        open_now += 1
        most = max(most, open_now)
        writer.write(b"220 slow.test\r\n")
        try:
            while line := await reader.readline():
                if line.startswith(b"RCPT"):
                    await release.wait()
                writer.write(b"221 bye\r\n" if line.startswith(b"QUIT") else b"250 ok\r\n")
                await writer.drain()
        finally:
            open_now -= 1
            writer.close()

    server = await asyncio.start_server(slow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    snap = _snapshot(
        tmp_path,
        [{"domain": "example.com", "mode": "callout", "callout": {"concurrency": 1}}],
        port,
    )
    validator = RecipientValidator()
    resolver = DnsResolver(snap.config.gateway.dns)
    connector = snap.config.send_connectors[0]
    pending = [validator.check(snap, resolver, f"u{i}@example.com", connector) for i in range(3)]
    tasks = [
        asyncio.ensure_future(p) for p in pending if p is not None and not isinstance(p, Reply)
    ]
    assert len(tasks) == 3
    await asyncio.sleep(0.3)
    assert (most, validator.probes) == (1, 1)  # the others wait for their turn
    release.set()
    assert await asyncio.gather(*tasks) == [None, None, None]
    assert most == 1
    server.close()


# -- LDAP against a private slapd --------------------------------------------------------


@pytest.fixture(scope="module")
def directory() -> Iterator[Slapd]:
    people = person("alice", "alice@example.com", "a.smith@example.com") + "\n"
    people += person("star", "*@example.com") + "\n"  # a stored "*" is a value, not a wildcard
    with running_slapd(people) as slapd:
        yield slapd


def _ldap(tmp_path: Path, url: str, **extra: Any) -> LdapSettings:
    secret = tmp_path / "ldap.secret"
    secret.write_text(PASSWORD + "\n")
    secret.chmod(0o600)
    return LdapSettings.model_validate(
        {
            "url": url,
            "bind_dn": MANAGER,
            "password_file": str(secret),
            "base": f"ou=people,{SUFFIX}",
            "filter": "(mail={address})",
            "timeout": 3,
            **extra,
        }
    )


async def test_ldap_lookup(tmp_path: Path, directory: Slapd) -> None:
    lookup = Lookup(_ldap(tmp_path, directory.url))
    assert (await lookup.run("alice@example.com")).result == "valid"
    assert (await lookup.run("A.Smith@example.com")).result == "valid"  # mail is case-blind
    assert (await lookup.run("nobody@example.com")).result == "invalid"
    # The address is escaped into the filter (RFC 4515 §3): no wildcard, no injection.
    assert search_filter("(mail={address})", "*@example.com") == r"(mail=\2a@example.com)"
    assert (await lookup.run("a*@example.com")).result == "invalid"
    assert (await lookup.run("x)(mail=*@example.com")).result == "invalid"


async def test_ldap_trouble_is_unknown(tmp_path: Path, directory: Slapd) -> None:
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    bad_password = _ldap(wrong, directory.url)
    assert bad_password.password_file is not None
    bad_password.password_file.write_text("not the password\n")
    refused = await Lookup(bad_password).run("alice@example.com")
    assert (refused.result, refused.reached) == ("unknown", True)
    assert "not the password" not in refused.detail  # secrets are never in a reason
    assert "bind failed" in refused.detail
    no_base = await Lookup(_ldap(tmp_path, directory.url, base="ou=gone," + SUFFIX)).run(
        "alice@example.com"
    )
    assert no_base.result == "unknown"
    down = await Lookup(_ldap(tmp_path, f"ldap://127.0.0.1:{free_port()}")).run("a@example.com")
    assert (down.result, down.reached) == ("unknown", False)


async def test_ldap_mode_in_the_validator(tmp_path: Path, directory: Slapd) -> None:
    settings = _ldap(tmp_path, directory.url, negative_ttl=60)
    snap = _snapshot(
        tmp_path,
        [{"domain": "example.com", "mode": "ldap", "ldap": settings.model_dump(mode="json")}],
    )
    validator = RecipientValidator()
    resolver = DnsResolver(snap.config.gateway.dns)

    async def answer(recipient: str) -> int:
        found = validator.check(snap, resolver, recipient, None)
        if found is not None and not isinstance(found, Reply):
            found = await found
        return 250 if found is None else found.code

    assert [await answer("alice@example.com"), await answer("bob@example.com")] == [250, 550]
    assert [await answer("alice@example.com"), await answer("bob@example.com")] == [250, 550]
    assert validator.probes == 2  # the second answers came from the cache
    text = explain(
        snap.config, ProfileIndex(snap.config), {}, Facts("192.0.2.1", recipients=["x@example.com"])
    ).as_text()
    assert "validation: checked in the directory at RCPT" in text


async def test_a_utf8_address_is_probed_only_with_smtputf8(
    tmp_path: Path, servers: dict[str, int]
) -> None:
    """RFC 6531 §3.4: MAIL FROM:<> SMTPUTF8 where offered; without it, no answer (451)."""
    offered = await bounded(_probe(tmp_path, servers["knows"]), "jörg@example.com", 5)
    assert (offered.result, offered.reached) == ("invalid", True)  # asked, and answered

    async def plain(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 plain.test\r\n")
        while line := await reader.readline():
            writer.write(b"221 bye\r\n" if line.startswith(b"QUIT") else b"250 ok\r\n")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(plain, "127.0.0.1", 0)
    try:
        result = await bounded(
            _probe(tmp_path, server.sockets[0].getsockname()[1]), "jörg@example.com", 5
        )
        assert result.result == "unknown"
        assert "SMTPUTF8" in result.detail
    finally:
        server.close()
