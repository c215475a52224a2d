"""The manual's *Send credentials*: a message with a connection profile's user
names and passwords for ``gateway.admin_address``, queued like any other."""

from __future__ import annotations

from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path

from smtpgate.errors import ConfigError, FieldProblem
from smtpgate.model.envelope import Envelope, Recipient
from smtpgate.observe.log import get_logger
from smtpgate.snapshot import Snapshot
from smtpgate.spool import SpooledBody, new_queue_id

log = get_logger("smtpgate.admin")


def credentials_message(
    policy: Snapshot, profile_name: str, spool_dir: Path
) -> tuple[Envelope, SpooledBody]:
    """The manual's *Send credentials*: a message with a profile's user names and
    passwords for ``gateway.admin_address``, to be queued like any other. It
    contains the passwords in clear, so route it over a connector with TLS.
    """
    config = policy.config
    admin = config.gateway.admin_address
    if not admin:
        raise ConfigError([FieldProblem("gateway.admin_address", "needed to send credentials")])
    if profile_name not in policy.profiles.profiles:
        raise ConfigError([FieldProblem("connection_profiles", f"no profile {profile_name!r}")])
    users = sorted(
        (user, secret.get_secret_value())
        for user, (owner, secret) in policy.credentials.users.items()
        if owner == profile_name
    )
    sender = f"postmaster@{config.gateway.hostname}"
    if policy.route(sender, admin) is None:
        raise ConfigError([FieldProblem("send_connectors", f"no connector routes to {admin}")])
    message = EmailMessage()
    message["From"] = sender
    message["To"] = admin
    message["Subject"] = f"SMTP AUTH credentials of connection profile {profile_name}"
    message["Date"] = format_datetime(datetime.now(UTC))
    message["Message-ID"] = make_msgid(domain=config.gateway.hostname)
    lines = [
        f"Connection profile {profile_name} on {config.gateway.hostname} "
        f"({config.gateway.node}) has these SMTP AUTH credentials:",
        "",
    ]
    lines += [f"  user name: {user}\n  password:  {password}\n" for user, password in users]
    message.set_content("\n".join(lines) if users else "This profile has no credentials.\n")
    body = SpooledBody(spool_dir, new_queue_id())
    body.write(message.as_bytes(policy=message.policy.clone(linesep="\r\n")))
    body.finish()
    log.info("credentials queued", profile=profile_name, to=admin, users=len(users))
    return Envelope(sender=sender, recipients=(Recipient(admin),)), body
