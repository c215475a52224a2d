"""Table tests for the command grammar: paths and ESMTP parameters."""

from __future__ import annotations

import pytest

from smtpgate.proto.grammar import (
    SyntaxProblem,
    decode_xtext,
    parse_bdat,
    parse_mail_params,
    parse_path,
    parse_rcpt_params,
    split_params,
)


@pytest.mark.parametrize(
    ("text", "sender", "utf8", "expected"),
    [
        ("<a@b.example>", True, False, "a@b.example"),
        ("<>", True, False, ""),
        ('<"john doe"@b.example>', False, False, '"john doe"@b.example'),
        ('<"a>b"@b.example> SIZE=1', True, False, '"a>b"@b.example'),
        ("<@relay.example,@r2.example:user@b.example>", False, False, "user@b.example"),
        ("<user@[192.0.2.1]>", False, False, "user@[192.0.2.1]"),
        ("<user@[IPv6:2001:db8::1]>", False, False, "user@[IPv6:2001:db8::1]"),
        ("<jörg@bücher.example>", False, True, "jörg@xn--bcher-kva.example"),  # normal form
        ("<under_score@my_host.example>", False, False, "under_score@my_host.example"),
    ],
)
def test_valid_paths(text: str, sender: bool, utf8: bool, expected: str) -> None:
    assert parse_path(text, sender=sender, smtputf8=utf8)[0] == expected


@pytest.mark.parametrize(
    ("text", "sender", "status"),
    [
        ("a@b.example", False, "5.1.3"),  # no angle brackets
        ("<>", False, "5.1.3"),  # null recipient
        ("<a@b.example", True, "5.1.7"),
        ("<a@b.example>x", False, "5.1.3"),
        ("<@relay.example user@b.example>", False, "5.1.3"),
        ("<" + "x" * 65 + "@b.example>", False, "5.1.3"),  # local part > 64
        (
            "<a@" + "d" * 63 + "." + "e" * 63 + "." + "f" * 63 + "." + "g" * 63 + ".example>",
            False,
            "5.1.3",
        ),
        ("<a@b..example>", False, "5.1.3"),
        ("<a@b.example.>", False, "5.1.3"),  # trailing dot
        ("<a@-b.example>", False, "5.1.3"),
        ("<a..b@b.example>", False, "5.1.3"),
        ("<a@[300.1.1.1]>", False, "5.1.3"),
        ("<a@[IPv6:zz::1]>", False, "5.1.3"),
        ("<jörg@b.example>", False, "5.6.7"),  # UTF-8 without SMTPUTF8
        ("<a b@b.example>", False, "5.1.3"),
    ],
)
def test_invalid_paths(text: str, sender: bool, status: str) -> None:
    with pytest.raises(SyntaxProblem) as caught:
        parse_path(text, sender=sender, smtputf8=False)
    assert caught.value.reply.status == status


def test_mail_parameters() -> None:
    params = parse_mail_params(
        split_params("SIZE=1000 BODY=8bitmime SMTPUTF8 RET=hdrs ENVID=QQ+2B1 AUTH=<>")
    )
    assert params.size == 1000
    assert params.body == "8BITMIME"
    assert params.smtputf8
    assert params.ret == "HDRS"
    assert params.envid == "QQ+1"
    assert params.auth == "<>"


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("SIZE=abc", 501),
        ("SIZE=", 501),
        ("BODY=BINARYMIME", 501),
        ("RET=ALL", 501),
        ("ENVID=bad+zz", 501),
        ("SMTPUTF8=yes", 501),
        ("SIZE=1 SIZE=2", 501),
        ("XFORWARD=1", 555),
    ],
)
def test_bad_mail_parameters(text: str, code: int) -> None:
    with pytest.raises(SyntaxProblem) as caught:
        parse_mail_params(split_params(text))
    assert caught.value.reply.code == code


def test_rcpt_parameters() -> None:
    params = parse_rcpt_params(split_params("NOTIFY=SUCCESS,DELAY ORCPT=rfc822;a+2Bb@c.example"))
    assert params.notify == frozenset({"SUCCESS", "DELAY"})
    assert params.orcpt == ("rfc822", "a+b@c.example")
    assert parse_rcpt_params(split_params("NOTIFY=NEVER")).notify == frozenset()


@pytest.mark.parametrize(
    "text", ["NOTIFY=NEVER,SUCCESS", "NOTIFY=SOMETIMES", "ORCPT=rfc822", "ORCPT=;x"]
)
def test_bad_rcpt_parameters(text: str) -> None:
    with pytest.raises(SyntaxProblem):
        parse_rcpt_params(split_params(text))


def test_xtext() -> None:
    assert decode_xtext("a+2Bb+3Dc") == "a+b=c"
    with pytest.raises(SyntaxProblem):
        decode_xtext("a+2b")  # hex must be upper case (RFC 3461 §4)


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        ("10", (10, False)),
        ("0 LAST", (0, True)),
        ("5 last", (5, True)),
        ("", None),
        ("x", None),
        ("5 FIRST", None),
        ("-1", None),
    ],
)
def test_bdat_argument(arg: str, expected: tuple[int, bool] | None) -> None:
    assert parse_bdat(arg) == expected
