"""Errors a user can act on."""


class ConfigError(ValueError):
    """Bad input: the message names the file, the key, the bad value and what is valid."""


class ArtifactError(RuntimeError):
    """A stage's output on disk cannot be used (a weight file missing, cut short or unreadable): the
    message names the file and the stage directory to re-run or delete."""


def check_choice(name: str, value, valid) -> None:
    """``ConfigError`` unless ``value`` is one of ``valid`` (the message lists them)."""
    if value not in valid:
        raise ConfigError(f"{name}: {value!r} is not valid; valid: {', '.join(map(str, valid))}")


def check_positive(name: str, value, kind: type = int) -> None:
    """``ConfigError`` unless ``value`` is a positive finite ``kind`` (int or float; never a bool)."""
    import math

    # value <= 0 is False for NaN, and inf is positive: neither is a learning rate or a scale
    if (isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) or not value > 0
            or not math.isfinite(value)):
        raise ConfigError(f"{name}: {value!r} must be a positive {'finite number' if kind is float else 'integer'}")
