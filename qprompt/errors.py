"""The one exception type the CLI turns into a single-line error."""


class QPromptError(Exception):
    """A problem the user can fix: the message names the problem and the fix, in one line."""


class ExportError(Exception):
    """A broken or mismatched export folder, or a request it cannot serve (the CLI prints it as one line)."""
