"""The one exception type commands turn into a clean message and exit code 2."""


class UserError(Exception):
    """Bad input from the user: a wrong path, value or file. Reported without a traceback."""
