"""Inbound SMTP: listeners, sessions (socket ↔ protocol core ↔ policy), spool."""
