"""The exceptions the CLI turns into a single-line error (and exit code 2)."""


class QPromptError(Exception):
    """A problem the user can fix: the message names the problem and the fix, in one line."""


class ExportError(QPromptError):
    """A broken or mismatched export folder, or a request it cannot serve. Raised by the torch-free runtime; the
    server answers it with a 4xx."""


class Interrupted(QPromptError):
    """Ctrl-C stopped a run after saving what resumes it; a command running many runs (a tune) stops too."""
