"""Certificates reload without a restart.

Listener contexts load the new chain in place (``load_cert_chain`` on the
same ``SSLContext``), so new handshakes use it while sessions that already
completed theirs keep what they negotiated. Reloads happen when a
certificate's files change (checked every ``interval`` seconds) and on
SIGHUP (``smtpgate reload``). A certificate that fails to load is logged
and the old one stays in use: a bad file never takes a listener down.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.fernet import Fernet

from smtpgate.config.schema import Certificate
from smtpgate.errors import ConfigError
from smtpgate.observe.log import get_logger
from smtpgate.tls.certificates import as_files, load

log = get_logger("smtpgate.tls")


def _files(cert: Certificate) -> list[Path]:
    return [p for p in (cert.cert, cert.key, cert.pkcs12, cert.pin_file) if p is not None]


def _stamp(cert: Certificate) -> tuple[float, ...]:
    stamps = []
    for path in _files(cert):
        try:
            stamps.append(path.stat().st_mtime)
        except OSError:
            stamps.append(-1.0)
    return tuple(stamps)


@dataclass
class CertificateReloader:
    certificates: dict[str, tuple[int, Certificate]]  # name → (index in config, entry)
    contexts: dict[str, list[ssl.SSLContext]]  # name → contexts that serve it
    key_loader: Callable[[], Fernet]
    _stamps: dict[str, tuple[float, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._stamps = {name: _stamp(cert) for name, (_, cert) in self.certificates.items()}

    def reload(self, only_changed: bool = False) -> list[str]:
        """Reload (changed) certificates into their contexts; returns the names reloaded."""
        done = []
        for name, contexts in self.contexts.items():
            index, cert = self.certificates[name]
            stamp = _stamp(cert)
            if only_changed and stamp == self._stamps.get(name):
                continue
            self._stamps[name] = stamp
            try:
                key = self.key_loader() if cert.pin is not None else None
                loaded = load(cert, f"certificates[{index}]", key)
                with as_files(loaded) as (chain, private):
                    for context in contexts:
                        context.load_cert_chain(chain, private)
            except (ConfigError, OSError, ssl.SSLError) as exc:
                log.error(
                    "certificate reload failed; the old one stays", certificate=name, error=str(exc)
                )
                continue
            log.info("certificate reloaded", certificate=name)
            done.append(name)
        return done

    async def watch(self, interval: float = 30.0) -> None:
        while True:
            await asyncio.sleep(interval)
            self.reload(only_changed=True)
