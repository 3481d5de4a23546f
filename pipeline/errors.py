"""The one error type users see: a single line naming the file and the problem."""


class PipelineError(Exception):
    """A problem with the user's input or run directory.

    The CLI prints the message as one line and exits with status 2, instead of a
    traceback. Messages start with the offending path when there is one.
    """
