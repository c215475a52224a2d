"""The configuration document: one typed schema, its loader and its checks."""

from smtpgate.config.load import load_config, parse_config
from smtpgate.config.schema import GatewayConfig

__all__ = ["GatewayConfig", "load_config", "parse_config"]
