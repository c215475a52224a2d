"""The content pipeline's pure parts: combining verdicts, editing a head, and
rewriting a spooled body's head without reading the body whole."""

from __future__ import annotations

from pathlib import Path

import pytest

from smtpgate.content.headers import edit_head, field_line, field_named, split_head
from smtpgate.content.verdict import ScanResult, combine
from smtpgate.proto.replies import Reply
from smtpgate.spool import SpooledBody

REJECT = Reply.of(550, "5.7.1", "spam")
LATER = Reply.of(451, "4.7.1", "try later")


@pytest.mark.parametrize(
    ("actions", "expected"),
    [
        ([], "accept"),
        (["accept", "accept"], "accept"),
        (["accept", "quarantine"], "quarantine"),
        (["quarantine", "tempfail"], "tempfail"),
        (["tempfail", "reject", "quarantine"], "reject"),
    ],
)
def test_the_strictest_action_wins(actions: list[str], expected: str) -> None:
    replies = {"reject": REJECT, "tempfail": LATER}
    results = [ScanResult(f"s{i}", a, replies.get(a)) for i, a in enumerate(actions)]  # type: ignore[arg-type]
    outcome = combine(results)
    assert outcome.action == expected
    assert outcome.reply == replies.get(expected)


def test_headers_of_every_scanner_are_kept_in_order() -> None:
    outcome = combine(
        [
            ScanResult("auth", headers=(("Authentication-Results", "gw; spf=pass"),)),
            ScanResult("rspamd", headers=(("X-Spam-Score", "1.5"),), subject_prefix="[SPAM]"),
        ]
    )
    assert [h[0] for h in outcome.headers] == ["Authentication-Results", "X-Spam-Score"]
    assert outcome.subject_prefix == "[SPAM]"


def test_a_refusal_needs_its_reply() -> None:
    with pytest.raises(ValueError, match="needs its SMTP reply"):
        ScanResult("x", "reject")


def test_field_lines_are_one_safe_line_folded_at_spaces() -> None:
    line = field_line("X-Spam-Symbols", "A\r\nB\x00 " + " ".join(["SYMBOL_NAME"] * 12))
    assert b"\r\nB" not in line.split(b"\r\n\t")[0]
    assert all(len(part) <= 80 for part in line.split(b"\r\n"))
    assert line.endswith(b"\r\n")
    assert b"\x00" not in line


def test_edit_head_adds_on_top_rewrites_the_subject_once_and_drops_forgeries() -> None:
    head = (
        b"Received: from x\r\n"
        b"Authentication-Results: gw.test; spf=pass (forged)\r\n"
        b"Authentication-Results: other.example; dkim=pass\r\n"
        b"Subject: hello\r\n"
        b"\tworld\r\n"
    )
    new = edit_head(
        head,
        [("Authentication-Results", "gw.test; spf=fail")],
        "[SPAM]",
        field_named("Authentication-Results", "gw.test;"),
    )
    assert new.startswith(b"Authentication-Results: gw.test; spf=fail\r\n")
    assert b"(forged)" not in new
    assert b"other.example; dkim=pass" in new
    assert b"Subject: [SPAM] hello world\r\n" in new
    assert edit_head(new, (), "[SPAM]").count(b"[SPAM]") == 1


@pytest.mark.parametrize("size", [100, 300_000])  # in memory, and spilled to a file
def test_replace_head_keeps_the_body_octet_for_octet(tmp_path: Path, size: int) -> None:
    body = SpooledBody(tmp_path, "Q1", threshold=1000)
    rest = b"\r\n" + b"x" * size + b"\r\n"
    body.write(b"Subject: hi\r\nFrom: a@b\r\n" + rest)
    body.finish()
    head = body.head()
    assert head == b"Subject: hi\r\nFrom: a@b\r\n"
    body.replace_head(b"X-New: 1\r\n" + head, len(head))
    whole = b"".join(body.chunks())
    assert whole == b"X-New: 1\r\nSubject: hi\r\nFrom: a@b\r\n" + rest
    assert body.size == len(whole)
    assert split_head(whole)[1] == rest
    assert [p.name for p in tmp_path.iterdir()] == (["Q1.tmp"] if size > 1000 else [])


def test_a_verdict_field_the_sender_wrote_is_replaced_by_ours(tmp_path: Path) -> None:
    from smtpgate.content.apply import write_verdicts  # noqa: PLC0415

    body = SpooledBody(tmp_path, "Q2")
    body.write(
        b"X-Spam-Flag: NO\r\nX-Spam-Status: No, score=-100\r\n"
        b"Authentication-Results: mx.other.example; spf=pass\r\nSubject: hi\r\n\r\nbody\r\n"
    )
    body.finish()
    outcome = combine(
        [
            ScanResult("rspamd", headers=(("X-Spam-Status", "Yes, score=12"),)),
            ScanResult("auth", headers=(("Authentication-Results", "gw.test; spf=fail"),)),
        ]
    )
    write_verdicts(body, outcome)
    text = b"".join(body.chunks())
    assert b"score=-100" not in text
    assert text.count(b"X-Spam-Status") == 1
    assert b"X-Spam-Flag" not in text  # the whole X-Spam- family is ours once we write one
    assert b"mx.other.example; spf=pass" in text  # another hop's result stays
