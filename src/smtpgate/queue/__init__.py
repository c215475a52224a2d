"""The durable queue: store, ingest with group commit, schedule, manager, DSN."""
