"""The one exception type that reaches users.

Anything raised as ``SSD4RecError`` is a problem with the user's input (a file, a
config key, a checkpoint): ``main.py`` prints its message and exits with status 2
instead of showing a traceback. Messages name the file, line or key and say what
was expected.
"""


class SSD4RecError(Exception):
    """A user-facing error whose message says what was wrong and what was expected."""
