"""The one exception type the CLI shows to users as a plain message."""


class MoekdError(Exception):
    """A problem with the user's input or environment, explained in its message.

    The CLI prints it without a traceback and exits with status 2; anything else
    escaping a stage is a bug and keeps its traceback.
    """


def first_line(error: Exception) -> str:
    """An exception's message cut to its first line (transformers' load errors can list hundreds of classes)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
