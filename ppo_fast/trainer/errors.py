"""The trainer's error for a wrong setting, in a module of its own: the config and the data
readers both raise it, and the config loads the data readers, so neither may define it."""


class ConfigError(ValueError):
    """A config field is wrong; the message names it and says what it must be."""
