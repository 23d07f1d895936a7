"""The launcher's error for a bad config value (one home: every check module raises it)."""
from __future__ import annotations


class ConfigError(ValueError):
    """A bad config value; str() reads `<key>=<value>: <message>`."""

    def __init__(self, key: str, value: object, message: str) -> None:
        self.key = key
        self.value = value
        self.message = message
        super().__init__(f"{key}={format_value(value)}: {message}")


def format_value(value: object) -> str:
    """Render a value the way a user would type it on the command line."""
    if value is None:
        return "null"
    if value == "":
        return "''"
    return str(value)
