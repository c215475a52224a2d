"""Administration: the configuration lifecycle, the REST API, shared operations."""
