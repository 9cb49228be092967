"""The one exception type library code raises; the CLI turns it into a one-line message."""


class MoEConvertError(Exception):
    """A problem with the user's input or configuration, stated in one line."""
