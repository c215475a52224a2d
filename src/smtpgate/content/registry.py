"""The gateway's scanners, in the order their results are combined and their
header fields written (sender authentication first: its
``Authentication-Results`` is what the spam scanner reads)."""

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
