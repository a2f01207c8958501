"""Errors a user can act on."""


class ConfigError(ValueError):
    """Bad input: the message names the file, the key, the bad value and what is valid."""


class ArtifactError(RuntimeError):
    """A stage's output on disk cannot be used (a weight file missing, cut short or unreadable): the
    message names the file and the stage directory to re-run or delete."""
