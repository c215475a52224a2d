"""Adding the scanners' header fields to a message, and rewriting its Subject.

Pure functions on the message's head (its header section): values are made
safe (no CR, LF or NUL; ASCII, since they come from our scanners and
servers), long values are folded (RFC 5322 §2.2.3) and the new fields go on
top, in the order given, like a trace field of this hop. ``drop`` removes
existing fields with a given name and value prefix (an
``Authentication-Results`` with our own authserv-id is forged: RFC 8601 §5).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

FOLD_AT = 76


def safe_value(value: str) -> str:
    """One line of printable ASCII (anything else becomes '?')."""
    flat = re.sub(r"[\r\n\t]+", " ", value)
    return "".join(c if " " <= c <= "~" else "?" for c in flat).strip()


def field_line(name: str, value: str) -> bytes:
    """``Name: value`` folded at spaces to lines of about ``FOLD_AT`` octets."""
    words = safe_value(value).split(" ")
    lines, line = [], f"{name}:"
    for word in words:
        if len(line) + 1 + len(word) > FOLD_AT and line.strip() and not line.endswith(":"):
            lines.append(line)
            line = "\t" + word
        else:
            line += " " + word
    lines.append(line)
    return ("\r\n".join(lines) + "\r\n").encode("ascii")


def split_head(message: bytes) -> tuple[bytes, bytes]:
    """(header section with its final CRLF, the rest from the empty line on)."""
    end = message.find(b"\r\n\r\n")
    if end < 0:
        return message, b""
    return message[: end + 2], message[end + 2 :]


def _fields(head: bytes) -> list[bytes]:
    """The header fields of ``head``, each with its continuation lines."""
    out: list[bytes] = []
    for line in head.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and out:
            out[-1] += line
        else:
            out.append(line)
    return out


def edit_head(
    head: bytes,
    add: Sequence[tuple[str, str]] = (),
    subject_prefix: str = "",
    drop: Callable[[bytes], bool] | None = None,
) -> bytes:
    """``head`` with ``add`` on top, fields ``drop`` says so removed, and the
    Subject prefixed (once: a Subject already starting with it is left)."""
    kept = []
    prefix = safe_value(subject_prefix)
    for item in _fields(head):
        if drop is not None and drop(item):
            continue
        name, _colon, value = item.partition(b":")
        text = value.decode("ascii", "replace").strip()
        if prefix and name.strip().lower() == b"subject" and not text.startswith(prefix):
            kept.append(field_line("Subject", f"{prefix} {text}".strip()))
        else:
            kept.append(item)
    added = b"".join(field_line(name, value) for name, value in add)
    if prefix and not any(f.split(b":", 1)[0].strip().lower() == b"subject" for f in kept):
        added += field_line("Subject", prefix)
    return added + b"".join(kept)


def field_named(name: str, value_prefix: str = "") -> Callable[[bytes], bool]:
    """A ``drop`` test: fields called ``name`` whose value starts with ``value_prefix``."""
    wanted = name.lower().encode("ascii")
    start = value_prefix.lower().encode("ascii")

    def matches(item: bytes) -> bool:
        field_name, _colon, value = item.partition(b":")
        if field_name.strip().lower() != wanted:
            return False
        return b" ".join(value.split()).lower().startswith(start)

    return matches
