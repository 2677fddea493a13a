"""The one exception type for mistakes a user can fix (bad config, missing file, bad shard), and the
one way any layer words an error as a single line.

The CLI prints a UserError as a single line and exits with status 2; everything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

ONE_LINE_LIMIT = 200  # characters of an underlying error kept in a one-line message


class UserError(Exception):
    """A problem with the user's input, described in one line that names the culprit."""


class InvalidValue(UserError):
    """A value of a config section is wrong; `key` is relative to the section ("" for the section
    itself). A section knows only its own keys ("weight", not "data.sources.0.weight"); the walker
    in aimv2.config.load adds the path, so the message still names the full dotted key a user types."""

    def __init__(self, key: str, msg: str):
        super().__init__(f"config key '{key}': {msg}" if key else msg)
        self.key, self.msg = key, msg


def check(ok: bool, key: str, msg: str) -> None:
    """Raise InvalidValue(key, msg) unless `ok`: how a config section's `validate()` refuses a value."""
    if not ok:
        raise InvalidValue(key, msg)


def one_line(err: BaseException, limit: int = ONE_LINE_LIMIT) -> str:
    """Any exception as one line for a message that wraps it: an OmegaConf error names its config key,
    a UserError is its own text, anything else is prefixed by its type; whitespace runs become one
    space and the text is cut at `limit` characters."""
    key = getattr(err, "full_key", None)  # OmegaConf's errors carry the dotted key they are about
    lines = [line for line in (getattr(err, "msg", None) or str(err)).strip().splitlines() if line.strip()]
    text = " ".join(lines[0].split())[:limit] if lines else ""
    if key:
        return f"config key '{key}': {text}"
    if isinstance(err, UserError):
        return text
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
