"""The one exception type users see: bad configs, data, checkpoints or paths.

The CLI turns a `WorkbenchError` into a short message on stderr and its `exit_code` (2 for
bad input; subclasses such as `workbench.guard.Diverged` use others); anything else is a bug
and keeps its traceback.
"""


class WorkbenchError(Exception):
    """A problem with the user's input, with a message that says what to fix."""

    exit_code = 2
