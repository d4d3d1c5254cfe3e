"""The one exception type for bad input that the user can fix.

The CLI turns it into a one-line message and a non-zero exit; anything else is a bug and keeps
its traceback.
"""


class UserError(Exception):
    """Bad config, data, checkpoint or launch: the message names the key, file or rank."""
