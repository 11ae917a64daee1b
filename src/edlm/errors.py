"""Errors that reach the user as a message, not a traceback.

Every error raised for bad input derives from :class:`EdlmError`; the CLI prints its message and exits with
status 2. A message names the problem and the fix.
"""

import importlib.util


class EdlmError(Exception):
    """Bad input or state that the user can fix; the message says how."""


class ConfigError(EdlmError, ValueError):
    """A configuration value is missing, unknown or out of range."""


def require(*modules: str, install: str) -> None:
    """Raise :class:`EdlmError` naming the first of ``modules`` that is not installed and ``install``, the command that
    installs it. Call it before the work that needs the modules: they are located, not imported, so it costs nothing.

    Args:
        modules: top-level import names, e.g. ``"fastapi", "uvicorn"``.
        install: e.g. ``"pip install fastapi uvicorn"``.
    """
    for module in modules:
        if importlib.util.find_spec(module) is None:
            raise EdlmError(f"the Python package {module!r} is not installed; install it with: {install}")
