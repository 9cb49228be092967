"""The one exception type library code raises; the CLI turns it into a one-line message."""

from .model.errors import MoEConvertError

__all__ = ["MoEConvertError", "one_line"]


def one_line(e: BaseException) -> str:
    """An exception's message for a one-line error: its first non-empty line, else its type's name."""
    return next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
