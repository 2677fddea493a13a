"""The one exception type for mistakes a user can fix (bad config, missing file, bad shard).

The CLI prints it as a single line and exits with status 2; everything else is a bug and keeps
its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, described in one line that names the culprit."""
