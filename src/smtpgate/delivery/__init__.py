"""Outbound SMTP: a streaming client and the hand-off to the next hop."""
