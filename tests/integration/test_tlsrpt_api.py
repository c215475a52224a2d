"""TLS reports through a running gateway's API (``smtpgate serve`` with its API):
``smtpgate tlsrpt show --api`` reads a received report, ``POST /tlsrpt/send``
sends a day (nothing recorded: nothing sent) and refuses a malformed day."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from smtpgate.delivery.tlsrpt import build_report
from tests.conftest import SMTPGATE, run_tool
from tests.integration.conftest import Api

ROW = {
    "policy_type": "tlsa",
    "policy_strings": '["3 1 1 ab"]',
    "mx_patterns": "[]",
    "result": "tlsa-invalid",
    "receiving_mx": "mx.example.org",
    "receiving_ip": "192.0.2.25",
    "detail": "no TLSA record matches",
    "count": 4,
}


async def test_a_received_report_is_summarised_through_the_api(api: Api, tmp_path: Path) -> None:
    report = build_report(
        [ROW], "2026-11-28", "example.org", organization="Other Org",
        contact="mailto:tls@other.example", report_id="x1",
    )  # fmt: skip
    saved = tmp_path / "report.json.gz"
    saved.write_bytes(gzip.compress(json.dumps(report).encode()))
    where = ["--api", api.url, "--token", api.token]
    code, out = await run_tool(SMTPGATE, "tlsrpt", "show", *where, str(saved))
    assert code == 0, out
    assert "from:     Other Org (mailto:tls@other.example)" in out
    assert "policy:   example.org tlsa: 0 successful, 4 failed" in out
    assert "  4 x tlsa-invalid at mx.example.org (no TLSA record matches)" in out
    junk = tmp_path / "junk.txt"
    junk.write_bytes(b"hello")
    code, out = await run_tool(SMTPGATE, "tlsrpt", "show", *where, str(junk))
    assert code == 1
    assert "not a TLS report" in out


async def test_sending_a_day_through_the_api(api: Api) -> None:
    assert await api.ok("POST", "/tlsrpt/send", params={"day": "2026-11-28"}) == {
        "day": "2026-11-28",
        "sent": [],
    }
    refused = await api.call("POST", "/tlsrpt/send", params={"day": "yesterday"})
    assert refused.status_code == 422
