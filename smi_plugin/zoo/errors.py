"""The zoo's one error type, shared by every way a model comes in."""


class TeacherError(ValueError):
    """A teacher name, checkpoint or card that cannot be used, with what to do instead."""
