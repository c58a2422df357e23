"""Errors a user causes (bad input, bad files): the CLI prints them as one
line and exits 2; they never show a traceback."""


class UserError(Exception):
    """Printed as `authgate: <message>`, exit status 2."""


class ConfigError(UserError):
    """A user-caused configuration problem: file, key path and bad value."""
