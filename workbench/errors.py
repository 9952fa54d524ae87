"""The exceptions users see: bad configs, data, checkpoints or paths.

The CLI turns a `WorkbenchError` into a short message on stderr and its `exit_code` (2 for
bad input; subclasses such as `workbench.guard.Diverged` use others); anything else is a bug
and keeps its traceback. The library packages do not import the workbench: they raise their
own input errors (`INPUT_ERRORS`), which the CLI reports the same way, with exit code 2.
"""

from students.errors import ReducerError, StudentLoadError
from teachers.errors import TeacherError


class WorkbenchError(Exception):
    """A problem with the user's input, with a message that says what to fix."""

    exit_code = 2


INPUT_ERRORS = (WorkbenchError, TeacherError, StudentLoadError, ReducerError)


def exit_code(error: BaseException) -> int:
    """The exit code for one of `INPUT_ERRORS`: its own (`Diverged`: 3, signals 128 + n) or 2."""
    return getattr(error, "exit_code", 2)
