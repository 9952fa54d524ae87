"""The exceptions the student library raises for unusable input; it imports nothing of the
workbench, whose CLI turns them into exit-2 messages."""


class StudentLoadError(ValueError):
    """A student folder that is missing or unreadable (no config.json, bad JSON, missing or
    truncated weights); the workbench turns it into an exit-2 message."""


class ReducerError(ValueError):
    """A token reducer's option that only a forward can find unusable (FrameFusion's cost
    below what its merges already spent); the workbench turns it into an exit-2 message."""
