"""User-facing errors (the CLI prints one line and exits non-zero, never a traceback) and warnings."""


class TwinlmError(Exception):
    """Bad input or a state the user can fix; the message says what and how."""


class ConfigError(TwinlmError, ValueError):
    """A model configuration that cannot be built."""


class TwinlmWarning(UserWarning):
    """Something the user should know that does not stop the command; the CLI prints it as one line."""
