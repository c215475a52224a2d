"""What ``smtpgate serve`` checks about privileges before it starts.

Started as root, it must know whom to drop to (``gateway.user``) and that
user must be able to read every file the gateway reads again after the drop:
certificates and keys (reloads, applied revisions), DKIM keys, password files
(the API process opens the store with ``gateway.store_password_file``).
"""

from __future__ import annotations

from pathlib import Path

from smtpgate.config.schema import GatewayConfig
from smtpgate.config.validate import secret_files
from smtpgate.privileges import Drop, PrivilegeError, plan


def files_read_later(config: GatewayConfig) -> list[tuple[str, Path]]:
    """Every file the running gateway may read again, with its field path."""
    found = secret_files(config)
    for i, cert in enumerate(config.certificates):
        for field in ("cert", "key", "pkcs12"):
            path = getattr(cert, field)
            if path is not None:
                found.append((f"certificates[{i}].{field}", path))
    found += [
        (f"sender_auth.dkim_signing[{i}].key_file", entry.key_file)
        for i, entry in enumerate(config.sender_auth.dkim_signing)
        if entry.key_file is not None
    ]
    found += [(f"tls.ca_files[{i}]", Path(p)) for i, p in enumerate(config.tls.ca_files)]
    return found


def privileges_for(config: GatewayConfig) -> Drop | None:
    """Whom ``serve`` drops to after binding (None: it stays as it is);
    PrivilegeError naming the settings when it must not start."""
    gateway = config.gateway
    drop = plan(gateway.user, gateway.group, allow_root=gateway.allow_root)
    if drop is None:
        return None
    problems = drop.unreadable(files_read_later(config))
    if problems:
        raise PrivilegeError("; ".join(problems))
    return drop
