"""Errors a user can act on."""


class ConfigError(ValueError):
    """Bad input: the message names the file, the key, the bad value and what is valid."""
