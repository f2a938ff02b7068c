"""Errors a user can act on, shared by every layer of the package."""


class ConfigError(ValueError):
    """A configuration value the user can fix; the message names the key and the fix."""
