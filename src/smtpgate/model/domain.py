"""The one normal form of a domain name, for every comparison and every next hop.

Hosted domains, sender domains, namespace patterns, spoof detection, relay
decisions and the envelope passed on all use :func:`normalise_domain`, so a
domain is decided on in exactly the form in which it is relayed.

The normal form is the lower-case A-label form (RFC 5890 §2.3.2.1), which is
ASCII and therefore safe to pass to any next hop and to DNS, with or without
SMTPUTF8 (RFC 6531). The steps:

* UTS #46 mapping, nontransitional (UTS #46 §4): upper case to lower case,
  fullwidth letters to ASCII, the ideographic full stop U+3002 and its
  siblings to ``.``, the soft hyphen U+00AD removed, NFC. ``ß`` stays ``ß``
  (IDNA 2008), so ``faß.example`` is ``xn--fa-hia.example`` and distinct from
  ``fass.example``; the IDNA 2003 codec of Python (``str.encode("idna")``)
  folded them together.
* A label with non-ASCII characters must be a valid U-label (RFC 5891 §4.2:
  IDNA 2008 code points, hyphens, joiners, bidi) and becomes its A-label.
* A label starting with ``xn--`` must be a valid A-label: it decodes to a
  valid U-label that encodes back to exactly the same label (RFC 5890
  §2.3.2.1, RFC 5891 §5.4); junk such as ``xn--`` or ``xn---bbk`` is refused.
* Any other (ASCII) label keeps the rules the gateway always had: letters,
  digits, hyphens and underscores, at most 63 octets, no hyphen first or last
  (RFC 1123 §2.1). The underscore is not LDH (RFC 5321 §4.1.2) but is kept
  for ASCII labels, as Postfix does, because internal host names carry it; a
  U-label may not contain it (IDNA 2008 disallows it).
* At most 253 octets in the A-label form (RFC 1035 §2.3.4), no empty label
  and no trailing dot.

Namespace patterns (``*`` and ``?``) are normalised by
:func:`normalise_pattern` with the same rules, label by label.
"""

from __future__ import annotations

import re

import idna

MAX_DOMAIN = 253  # octets of the A-label form without a trailing dot (RFC 1035 §2.3.4)
MAX_LABEL = 63
_MAX_INPUT = 1024  # longer text is refused before any mapping work
_ACE_PREFIX = "xn--"
_ASCII_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\Z")
_WILDCARD_LABEL = re.compile(r"[a-z0-9_*?-]{1,63}\Z")
WILDCARDS = frozenset("*?")


class DomainError(ValueError):
    """A domain name that has no normal form; ``reason`` is ASCII, for a reply."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


def _printable(text: str) -> str:
    """``text`` with anything but printable ASCII written as ``U+XXXX``."""
    return "".join(ch if " " <= ch <= "~" else f"U+{ord(ch):04X}" for ch in text)


def _map(text: str) -> str:
    """UTS #46 mapping (nontransitional, STD3 rules off: ``_`` passes)."""
    if len(text) > _MAX_INPUT:
        raise DomainError(f"longer than {_MAX_INPUT} characters")
    if text.isascii():
        return text.lower()  # for ASCII, the mapping is exactly lower-casing
    try:
        return idna.uts46_remap(text, std3_rules=False, transitional=False)
    except (UnicodeError, ValueError) as exc:  # idna.IDNAError is a UnicodeError
        raise DomainError(f"refused by UTS #46: {_printable(str(exc))}") from None


def _idn_label(label: str) -> str:
    """A U-label or an ``xn--`` label → its validated A-label."""
    ace = label.startswith(_ACE_PREFIX)
    try:
        a_label = idna.alabel(idna.ulabel(label) if ace else label).decode("ascii")
    except (UnicodeError, ValueError) as exc:  # idna.IDNAError is a UnicodeError
        reason = f"label '{_printable(label)}' refused by IDNA 2008: {_printable(str(exc))}"
        raise DomainError(reason) from None
    if ace and a_label != label:  # decodes to plain ASCII, or is not canonical Punycode
        raise DomainError(f"label '{label}' is not a valid A-label")
    return a_label


def _label(label: str) -> str:
    if not label:
        raise DomainError("empty label")
    if label.isascii() and not label.startswith(_ACE_PREFIX):
        if not _ASCII_LABEL.match(label):
            raise DomainError(
                f"label '{_printable(label)}': only letters, digits, '-' and '_', "
                f"at most {MAX_LABEL}, no '-' at either end"
            )
        return label
    return _idn_label(label)


def _check_length(domain: str) -> str:
    if len(domain) > MAX_DOMAIN:
        raise DomainError(f"longer than {MAX_DOMAIN} octets")
    return domain


def normalise_domain(text: str) -> str:
    """``"Bücher.EXAMPLE"`` → ``"xn--bcher-kva.example"``; raises :class:`DomainError`.

    Not for address literals (``[192.0.2.1]``): callers handle those first.
    """
    if not text:
        raise DomainError("empty domain")
    mapped = _map(text)
    if mapped.endswith("."):
        raise DomainError("trailing dot")
    return _check_length(".".join(_label(label) for label in mapped.split(".")))


def _pattern_label(label: str) -> str:
    if not WILDCARDS.intersection(label):
        return _label(label)
    if not _WILDCARD_LABEL.match(label):
        raise DomainError(
            f"label '{_printable(label)}': a label with * or ? may only hold "
            "ASCII letters, digits, '-' and '_'"
        )
    return label


def normalise_pattern(pattern: str) -> str:
    """A namespace pattern in normal form: ``"*.Bücher.example"`` →
    ``"*.xn--bcher-kva.example"``; raises :class:`DomainError`.

    Labels without wildcards are normalised like domains, so a pattern
    matches the normal form of every spelling of a domain. A label with a
    wildcard must be ASCII: a wildcard cannot stand for part of a U-label,
    whose A-label is encoded as a whole. An address-literal pattern
    (``[192.0.2.1]``) is only lower-cased; ``""`` matches the null sender.
    """
    if not pattern or pattern.startswith("["):
        return pattern.lower()
    mapped = _map(pattern)
    if mapped.endswith("."):
        raise DomainError("trailing dot")
    return ".".join(_pattern_label(label) for label in mapped.split("."))
