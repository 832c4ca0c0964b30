"""The one exception type for mistakes a user can make (bad file, bad option, unknown model).

The CLI catches it and prints its message as one line with exit code 2; anything else
is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix; its message is printed as one line."""
