"""The one exception type library code raises (`moe_convert.errors` re-exports it).

It lives with the model because the model's own checks raise it, and a saved checkpoint's copy of
this package carries no module outside `model/`.
"""


class MoEConvertError(Exception):
    """A problem with the user's input or configuration, stated in one line."""
