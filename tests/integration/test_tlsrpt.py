"""TLS reporting (RFC 8460) end to end: a day's sessions (MTA-STS testing, a next hop
whose certificate does not match) are counted; ``smtpgate tlsrpt send`` (a real
process) sends the day's report to the domain's ``rua``: by mail through the
queue to the sink, and by HTTPS POST to a real HTTPS server; the report
validates against the JSON of RFC 8460 §4.4; ``smtpgate tlsrpt show`` reads it."""

from __future__ import annotations

import asyncio
import email
import email.policy
import gzip
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from smtpgate.delivery.tlsrpt import RESULT_TYPES, build_report, utc_day
from tests.conftest import SMTPGATE, Certs, GatewayFactory, SinkHandle, base_config, merge, run_tool
from tests.integration.outbound_security import (
    POLICY_PATH,
    issue,
    policy_response,
    policy_text,
    send,
    start_dns_for,
    start_https,
    start_pair,
)

DATE_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def schema_errors(report: Any) -> list[str]:  # noqa: PLR0912 - the schema, field by field
    """What in ``report`` breaks the report format of RFC 8460 §4.3-4.4 (empty: valid)."""
    errors: list[str] = []
    if not isinstance(report, dict):
        return ["the report is not an object"]
    for name in ("organization-name", "contact-info", "report-id"):
        if not isinstance(report.get(name), str) or not report[name]:
            errors.append(f"{name}: a non-empty string is required")
    dates = report.get("date-range")
    if not isinstance(dates, dict):
        errors.append("date-range: an object is required")
    else:
        for name in ("start-datetime", "end-datetime"):
            if not isinstance(dates.get(name), str) or not DATE_TIME.match(dates[name]):
                errors.append(f"date-range.{name}: an RFC 3339 date-time is required")
    policies = report.get("policies")
    if not isinstance(policies, list) or not policies:
        return [*errors, "policies: a non-empty array is required"]
    for i, entry in enumerate(policies):
        where = f"policies[{i}]"
        policy, summary = entry.get("policy"), entry.get("summary")
        if not isinstance(policy, dict):
            errors.append(f"{where}.policy: an object is required")
        else:
            if policy.get("policy-type") not in ("tlsa", "sts", "no-policy-found"):
                errors.append(f"{where}.policy.policy-type: tlsa, sts or no-policy-found")
            if not isinstance(policy.get("policy-domain"), str):
                errors.append(f"{where}.policy.policy-domain: a string is required")
            for name in ("policy-string", "mx-host"):
                if name in policy and not _strings(policy[name]):
                    errors.append(f"{where}.policy.{name}: an array of strings")
        if not isinstance(summary, dict) or not all(
            _count(summary.get(k))
            for k in ("total-successful-session-count", "total-failure-session-count")
        ):
            errors.append(f"{where}.summary: both session counts are required")
            continue
        details = entry.get("failure-details", [])
        if not isinstance(details, list):
            errors.append(f"{where}.failure-details: an array")
            continue
        for j, detail in enumerate(details):
            if detail.get("result-type") not in RESULT_TYPES:
                errors.append(f"{where}.failure-details[{j}].result-type: {detail}")
            if not _count(detail.get("failed-session-count")):
                errors.append(f"{where}.failure-details[{j}].failed-session-count")
            for name in (
                "sending-mta-ip", "receiving-mx-hostname", "receiving-mx-helo", "receiving-ip",
                "additional-information", "failure-reason-code",
            ):  # fmt: skip
                if name in detail and not isinstance(detail[name], str):
                    errors.append(f"{where}.failure-details[{j}].{name}: a string")
        if (
            sum(d.get("failed-session-count", 0) for d in details)
            > summary["total-failure-session-count"]
        ):
            errors.append(f"{where}: more failures in the details than in the summary")
    return errors


def test_the_schema_check_catches_what_it_should() -> None:
    good = build_report(
        [
            {"policy_type": "sts", "policy_strings": '["version: STSv1"]',
             "mx_patterns": '["mx.example.com"]', "result": "success", "receiving_mx": "",
             "receiving_ip": "", "detail": "", "count": 3},
            {"policy_type": "sts", "policy_strings": '["version: STSv1"]',
             "mx_patterns": '["mx.example.com"]', "result": "certificate-expired",
             "receiving_mx": "mx.example.com", "receiving_ip": "192.0.2.1", "detail": "",
             "count": 1},
        ],
        "2026-11-28", "example.com", organization="Org", contact="ops@example.org",
        report_id="r1",
    )  # fmt: skip
    assert schema_errors(good) == []
    assert good["policies"][0]["summary"] == {
        "total-successful-session-count": 3,
        "total-failure-session-count": 1,
    }
    bad = json.loads(json.dumps(good))
    bad["policies"][0]["failure-details"][0]["result-type"] = "bad-luck"
    del bad["date-range"]["end-datetime"]
    assert len(schema_errors(bad)) == 2


def _report_of(raw: bytes) -> dict[str, Any]:
    """The report in a report message, after checking the message (RFC 8460 §5.3)."""
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "tlsrpt"
    assert message["TLS-Report-Domain"] == "example.com"
    assert message["Subject"].startswith("Report Domain: example.com Submitter: gw.test")
    [part] = [p for p in message.walk() if p.get_content_type() == "application/tlsrpt+gzip"]
    assert re.match(r"^gw\.test!example\.com!\d+!\d+!.+\.json\.gz$", part.get_filename() or "")
    payload = part.get_payload(decode=True)
    assert isinstance(payload, bytes)
    report = json.loads(gzip.decompress(payload))
    assert schema_errors(report) == []
    return dict(report)


def _check_report(report: dict[str, Any]) -> None:
    """A day of two sessions under MTA-STS testing, both with the wrong certificate."""
    assert report["organization-name"] == "Example Org"
    [entry] = report["policies"]
    assert entry["policy"]["policy-type"] == "sts"
    assert entry["policy"]["mx-host"] == ["mx.example.com"]
    assert "mode: testing" in entry["policy"]["policy-string"]
    assert entry["summary"] == {
        "total-successful-session-count": 0,
        "total-failure-session-count": 2,
    }
    [failure] = entry["failure-details"]
    assert (failure["result-type"], failure["receiving-mx-hostname"]) == (
        "certificate-host-mismatch",
        "mx.example.com",
    )


@pytest.mark.parametrize("by", ["cli", "gateway"])
async def test_a_days_report_is_valid_and_reaches_both_rua(
    gateway_factory: GatewayFactory, sink: SinkHandle, certs: Certs, tmp_path: Path, by: str
) -> None:
    """``by``: ``smtpgate tlsrpt send`` (the queue store), or the gateway's own daily
    run (its queue)."""
    directory = tmp_path / "certs"
    directory.mkdir()
    cert, key = issue(certs.ca, directory, "mta-sts.example.com", "127.0.0.1")
    https = await start_https(cert, key, {})
    https.responses[POLICY_PATH] = policy_response(policy_text("testing", "mx.example.com"))
    https.responses["/tlsrpt"] = (200, {}, b"")
    rua = f"mailto:tlsrpt@example.org,https://127.0.0.1:{https.port}/tlsrpt"
    dns, dns_port = await start_dns_for(
        {
            ("_mta-sts.example.com", "TXT"): ['"v=STSv1; id=7"'],
            ("mta-sts.example.com", "A"): ["127.0.0.1"],
            ("_smtp._tls.example.com", "TXT"): [f'"v=TLSRPTv1; rua={rua}"'],
        }
    )
    try:
        outbound = {
            "mta_sts_port": https.port,
            "tlsrpt": {
                "enabled": True,
                "organization": "Example Org",
                "contact": "tls@example.org",
            },
        }
        hop_cert = issue(certs.ca, directory, "other.example.net")
        _, sender, data_dir = await start_pair(
            gateway_factory, sink, certs, tmp_path, dns_port, hop_cert, outbound
        )
        for _ in range(2):
            await asyncio.to_thread(send, sender.port)
        assert len(await sink.wait_for(2)) == 2  # testing: delivered despite the failure

        document = merge(
            base_config(data_dir, sink.port),
            {
                "gateway": {"dns": {"nameservers": ["127.0.0.1"], "port": dns_port}},
                "tls": {"ca_files": [str(certs.ca_file)]},
                "outbound_security": outbound,
            },
        )
        config = tmp_path / "sender.yaml"
        config.write_text(yaml.safe_dump(document))
        day = utc_day()
        if by == "cli":
            code, out = await run_tool(
                SMTPGATE, "tlsrpt", "send", "--config", str(config), "--day", day
            )
            assert code == 0, out
        else:
            published = sender.gateway.manager.deliverer._published  # its daily run, now
            assert published is not None
            out = "\n".join(await published.send_reports(day))
        assert "example.com: queued" in out
        assert f"example.com: posted to https://127.0.0.1:{https.port}/tlsrpt" in out

        found = await sink.wait_for(3)
        [(meta, raw)] = [(m, b) for m, b in found if m["recipients"] == ["tlsrpt@example.org"]]
        assert meta["sender"] == ""
        _check_report(_report_of(raw))
        [post] = [r for r in https.requests if r[0] == "POST"]
        assert post[2]["content-type"] == "application/tlsrpt+gzip"
        assert schema_errors(json.loads(gzip.decompress(post[3]))) == []

        code, out = await run_tool(
            SMTPGATE, "tlsrpt", "send", "--config", str(config), "--day", day
        )
        assert (code, out.strip()) == (0, f"{day}: nothing to send")  # sent once

        saved = tmp_path / "report.eml"
        saved.write_bytes(raw)
        code, out = await run_tool(SMTPGATE, "tlsrpt", "show", "--config", str(config), str(saved))
        assert code == 0, out
        assert "policy:   example.com sts: 0 successful, 2 failed" in out
        assert "  2 x certificate-host-mismatch at mx.example.com" in out
    finally:
        https.close()
        assert dns.transport is not None
        dns.transport.close()
