"""The one exception type the CLI turns into a single-line error."""


class QPromptError(Exception):
    """A problem the user can fix: the message names the problem and the fix, in one line."""
