"""The one error type that user mistakes raise (the CLI prints it as one line, no traceback)."""


class AdamixError(Exception):
    """A problem with the user's input (files, options, models), not a bug in adamix."""
