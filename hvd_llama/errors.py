"""The one exception type for bad input that the user can fix.

The CLI turns it into a one-line message and a non-zero exit; anything else is a bug and keeps
its traceback.
"""

import json


class UserError(Exception):
    """Bad config, data, checkpoint or launch: the message names the key, file or rank."""


class RanksLost(Exception):
    """A collective failed: another rank died, hung up or was stopped by Horovod's stall
    inspector. Not this process's fault: one line naming the collective, exit status 1."""


def read_json(path, what):
    """The JSON document at `path`; a UserError naming the file (and `what` it should be)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: unreadable {what} ({e})") from e
