"""smtpgate: a secure SMTP email gateway.

The package is layered (see docs/architecture.md): ``proto`` and ``model`` know
nothing of sockets or configuration; ``config`` builds immutable snapshots;
``inbound`` and ``delivery`` do the I/O; ``app`` wires them; ``cli`` is the
command line.
"""

__version__ = "0.1.0"
