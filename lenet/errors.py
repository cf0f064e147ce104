"""The one exception type for mistakes a user can cause (bad file, bad flag, missing data)."""


class LenetError(Exception):
    """A user-caused error: the CLI prints its message as one line on stderr and exits with status 2.

    Messages name the file or field and say what was expected. Bugs raise anything else.
    """
