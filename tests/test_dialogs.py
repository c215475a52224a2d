"""Dialog transcripts (tests/dialogs/*.txt) run against an in-process gateway.

Format: ``C: line`` is sent with CRLF appended (Python escapes allowed);
``C~: bytes`` is sent exactly as written (escapes decoded, no CRLF added);
consecutive C lines go out in one write, so they are pipelined.
``S: line`` is the expected reply line, ``*`` matching anything;
``S: <closed>`` expects the server to close the connection.
"""

from __future__ import annotations

import asyncio
import codecs
import fnmatch
from pathlib import Path

import pytest

from tests.conftest import GatewayHandle, SinkHandle

DIALOGS = sorted((Path(__file__).parent / "dialogs").glob("*.txt"))


def _steps(path: Path) -> list[tuple[str, list[str]]]:
    steps: list[tuple[str, list[str]]] = []
    for raw in path.read_text().splitlines():
        if not raw.strip() or raw.startswith("#"):
            continue
        kind, _, text = raw.partition(":")
        text = text.removeprefix(" ")
        assert kind in ("C", "C~", "S"), f"{path.name}: bad line {raw!r}"
        side = "S" if kind == "S" else "C"
        entry = text if kind != "C" else text + "\\r\\n"
        if steps and steps[-1][0] == side:
            steps[-1][1].append(entry)
        else:
            steps.append((side, [entry]))
    return steps


@pytest.mark.parametrize("path", DIALOGS, ids=[p.stem for p in DIALOGS])
async def test_dialog(path: Path, gateway: GatewayHandle, sink: SinkHandle) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    try:
        greeting = await asyncio.wait_for(reader.readline(), 5)
        assert greeting.startswith(b"220 gw.test ESMTP")
        for side, lines in _steps(path):
            if side == "C":
                payload = "".join(codecs.decode(line, "unicode_escape") for line in lines)
                writer.write(payload.encode("latin-1"))
                await writer.drain()
                continue
            for expected in lines:
                got = await asyncio.wait_for(reader.readline(), 10)
                if expected == "<closed>":
                    assert got == b"", f"expected close, got {got!r}"
                    continue
                text = got.decode("utf-8", "replace").rstrip("\r\n")
                assert fnmatch.fnmatchcase(text, expected), f"{path.name}: {text!r} !~ {expected!r}"
    finally:
        writer.close()
