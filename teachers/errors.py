"""The exception the teachers raise for input a user can fix.

A missing or corrupt teacher folder, a teacher cache that is unfinished, changed or made for
other data: `TeacherError`, with a message that says what to do. The workbench's command
line turns it into a short message and exit code 2.
"""


class TeacherError(ValueError):
    """A teacher, its files or its cache cannot be used as given."""
