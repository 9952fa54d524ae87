"""The exception the student library raises for unusable input; it imports nothing of the
workbench, whose CLI turns it into an exit-2 message."""


class StudentLoadError(ValueError):
    """A student folder that is missing or unreadable (no config.json, bad JSON, missing or
    truncated weights); the workbench turns it into an exit-2 message."""
