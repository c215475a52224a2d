"""Is a recipient in the directory? One LDAP search (RFC 4511) per lookup.

``ldap3`` (pure Python: no C library or compiler on the gateway's machines;
its protocol code is stable, typeshed keeps its types) runs in a worker
thread, every step bounded: ``connect_timeout`` and ``receive_timeout`` are the
lookup's ``timeout``, the search's server-side time limit too, and the caller
bounds the whole. The conversation: connect (``ldaps://``, or StartTLS with
``start_tls``; the server's certificate is checked against the system's and
``tls.ca_files``' authorities and the URL's host name), bind (anonymous, or
``bind_dn`` with the password from ``password_file``, never logged), search
``base`` with ``filter`` for at most one entry and no attributes, unbind.

Values put into the filter are escaped (RFC 4515 §3), so an address cannot
change the filter. An entry found is *valid*, none *invalid*; anything else
(the directory unreachable, a failed bind, ``noSuchObject`` for a wrong base,
a timeout) is *unknown*: RCPT answers 451.
"""

from __future__ import annotations

import contextlib
import math
import ssl
from dataclasses import dataclass
from pathlib import Path

import ldap3
from ldap3.core.exceptions import LDAPException, LDAPSocketOpenError
from ldap3.utils.conv import escape_filter_chars

from smtpgate.config.schema import LdapSettings
from smtpgate.content.callout import CalloutResult
from smtpgate.policy.relay import split_address
from smtpgate.pools import Pool

SUCCESS, SIZE_LIMIT_EXCEEDED = 0, 4  # RFC 4511 §4.1.9 result codes
# lookups at once per process, on threads of their own: a slow directory
# never takes the threads the rest of the gateway shares (smtpgate.pools)
POOL = Pool("ldap", 64)
MAX_PASSWORD_FILE = 4096


def search_filter(template: str, address: str) -> str:
    """``template`` with the recipient's parts, each escaped (RFC 4515 §3)."""
    local, domain = split_address(address)
    return template.format(
        address=escape_filter_chars(address),
        local=escape_filter_chars(local),
        domain=escape_filter_chars(domain),
    )


@dataclass(frozen=True)
class Lookup:
    settings: LdapSettings
    ca_files: tuple[Path, ...] = ()

    async def run(self, address: str) -> CalloutResult:
        return await POOL.run(self._search, address)

    def _password(self) -> str | None:
        path = self.settings.password_file
        if path is None:
            return None
        with path.open("rb") as handle:
            data = handle.read(MAX_PASSWORD_FILE)
        return data.decode("utf-8").rstrip("\r\n")

    def _tls(self) -> ldap3.Tls:
        authorities = "".join(p.read_text() for p in self.ca_files)
        return ldap3.Tls(
            validate=ssl.CERT_REQUIRED,
            version=ssl.PROTOCOL_TLS_CLIENT,
            ca_certs_data=authorities or None,
        )

    def _search(self, address: str) -> CalloutResult:
        settings = self.settings
        url = settings.url.rstrip("/")
        try:
            server = ldap3.Server(
                url,
                use_ssl=url.startswith("ldaps:"),
                tls=self._tls(),
                connect_timeout=settings.timeout,
                get_info=ldap3.NONE,
            )
            connection = ldap3.Connection(
                server,
                user=settings.bind_dn,
                password=self._password(),
                receive_timeout=max(1, math.ceil(settings.timeout)),  # ldap3 packs an int
                read_only=True,
                raise_exceptions=False,
            )
        except (LDAPException, OSError, UnicodeDecodeError) as exc:
            return CalloutResult("unknown", f"{url}: {type(exc).__name__}: {exc}", reached=False)
        try:
            return self._converse(connection, url, address)
        except LDAPSocketOpenError as exc:
            return CalloutResult("unknown", f"{url}: cannot connect: {exc}", reached=False)
        except (LDAPException, OSError) as exc:
            return CalloutResult("unknown", f"{url}: {type(exc).__name__}: {exc}")
        finally:
            with contextlib.suppress(LDAPException, OSError):
                connection.unbind()

    def _converse(self, connection: ldap3.Connection, url: str, address: str) -> CalloutResult:
        settings = self.settings
        connection.open()
        if settings.start_tls and not connection.start_tls():
            return CalloutResult("unknown", f"{url}: StartTLS failed: {_said(connection)}")
        if not connection.bind():
            return CalloutResult("unknown", f"{url}: bind failed: {_said(connection)}")
        connection.search(
            settings.base,
            search_filter(settings.filter, address),
            search_scope=ldap3.SUBTREE,
            attributes=[ldap3.NO_ATTRIBUTES],
            size_limit=1,
            time_limit=max(1, int(settings.timeout)),
        )
        code = connection.result.get("result") if connection.result else None
        if code == SUCCESS:
            entries = [r for r in connection.response or [] if r.get("type") == "searchResEntry"]
            found = len(entries)
            return CalloutResult("valid" if found else "invalid", f"{url}: {found} entry found")
        if code == SIZE_LIMIT_EXCEEDED:  # more than one entry: it exists
            return CalloutResult("valid", f"{url}: several entries found")
        return CalloutResult("unknown", f"{url}: search failed: {_said(connection)}")


def _said(connection: ldap3.Connection) -> str:
    result = connection.result or {}
    return f"{result.get('result')} {result.get('description', '')} {result.get('message', '')}"
