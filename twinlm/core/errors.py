"""User-facing errors: the CLI prints these as one line and exits non-zero, never a traceback."""


class TwinlmError(Exception):
    """Bad input or a state the user can fix; the message says what and how."""
