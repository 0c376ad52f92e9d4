"""Errors caused by the user's input: shown as one line (exit code 2 in the CLI), never as a traceback."""


class UserError(ValueError):
    """Bad input: a config value, a missing or corrupt file, an out-of-range argument. One line, naming it."""
