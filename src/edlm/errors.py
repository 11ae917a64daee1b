"""Errors that reach the user as a message, not a traceback.

Every error raised for bad input derives from :class:`EdlmError`; the CLI prints its message and exits with
status 2. A message names the problem and the fix.
"""


class EdlmError(Exception):
    """Bad input or state that the user can fix; the message says how."""


class ConfigError(EdlmError, ValueError):
    """A configuration value is missing, unknown or out of range."""
