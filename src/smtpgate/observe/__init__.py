"""Observability: structured logging (one event per state transition)."""
