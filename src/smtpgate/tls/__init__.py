"""TLS: certificates and SSL contexts."""
