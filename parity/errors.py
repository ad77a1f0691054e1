"""The one exception type for errors a user can cause.

The CLI turns a ``ParityError`` into a one-line message and exit code 2; anything else escaping
is a bug in the tool, not in the user's input.
"""


class ParityError(Exception):
    """Bad input: a missing/corrupt/unsafe checkpoint, wrong shapes, bad ids, an unreadable dump.

    The message says what is wrong and, where it can, what to do about it.
    """
