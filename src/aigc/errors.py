"""The one exception type users see.

Anything raised as `AigcError` is a problem with the user's input or environment: the CLI prints
its message on one line and exits 1, the server answers 4xx with it as `detail`. Any other
exception is a bug and keeps its traceback.
"""


class AigcError(Exception):
    """A user-facing error: the message says what was wrong, what is allowed, and what to do."""


class ConfigError(AigcError, ValueError):
    """A bad config key, value or preset."""
