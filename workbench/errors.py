"""The one exception type users see: bad configs, data, checkpoints or paths.

The CLI turns a `WorkbenchError` into a short message on stderr and exit code 2; anything
else is a bug and keeps its traceback.
"""


class WorkbenchError(Exception):
    """A problem with the user's input, with a message that says what to fix."""
