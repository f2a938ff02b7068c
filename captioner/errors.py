"""Errors a user can act on, shared by every layer of the package."""


class ConfigError(ValueError):
    """A configuration value the user can fix; the message names the key and the fix."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that would run code when unpickled: refused before anything in it runs."""


class ImageLoadError(ValueError):
    """A file that is not a readable image; the message names the file."""
