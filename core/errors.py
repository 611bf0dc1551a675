"""Errors every layer may raise and the task layer's retry policy reads."""


class PermanentError(Exception):
    """An error that retrying cannot fix (bad input, missing data, a conflict): fail at once."""
