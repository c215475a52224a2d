"""The gateway's scanners. They run concurrently; this order is the order their
results are combined in (the first of equally strict verdicts gives the reply)
and their header fields are written (``Authentication-Results`` on top)."""

from __future__ import annotations

from smtpgate.content.clamd import ClamdScanner
from smtpgate.content.pipeline import Scanner
from smtpgate.content.rspamd import RspamdScanner
from smtpgate.content.senderauth import SenderAuth


def scanners() -> list[Scanner]:
    """One instance of each scanner for the gateway's lifetime (connection pools
    live here); each reads its settings from the configuration it is given."""
    return [
        SenderAuth(),
        ClamdScanner(),
        RspamdScanner(),
    ]


async def close(found: list[Scanner]) -> None:
    """Release what scanners hold (connection pools) when the gateway stops."""
    for scanner in found:
        aclose = getattr(scanner, "aclose", None)
        if aclose is not None:
            await aclose()


def states(found: list[Scanner]) -> dict[str, str]:
    """Each scanner's state for ``/status`` and ``cluster status``: ``up``, or
    ``down: why`` during an outage (the scanner keeps that as ``down``)."""
    out = {}
    for scanner in found:
        down = getattr(scanner, "down", None) or getattr(scanner, "_dns_down", None)
        out[scanner.name] = f"down: {down}" if isinstance(down, str) else "down" if down else "up"
    return out
